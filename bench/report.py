"""Writing a run's figures: bench/results/latest.json and latest.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.suite import Config, Suite

__all__ = ["TARGETS", "write_results"]

# Targets from the benchmarks issue: ratio name → minimum.
TARGETS: dict[str, float] = {
    "kv_get_direct_vs_echo": 0.75,
    "kv_get_gateway_vs_echo": 0.40,
    "batchget_keys_vs_get": 20.0,
    "put_vs_asyncpg": 0.70,
    "vector_qps_vs_sql": 0.80,
    "vector_filtered_qps_vs_sql": 0.80,
    "tracing_on_vs_off": 0.85,
}
GATEWAY_ADDED_P50_MS = 1.0


def results(suite: Suite, config: Config) -> dict[str, Any]:
    """The run as one JSON document (fixed names, comparable run to run)."""
    medians = suite.medians()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "config": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in config.__dict__.items()},
        "ratios": suite.ratios(),
        "echo_ceiling_rps": medians["echo"]["rps"] if "echo" in medians else None,
        "gateway_added_p50_ms": suite.gateway_added_p50_ms(),
        "one_process_added_p50_ms": suite.one_process_added_p50_ms(),
        "recall_at_10": suite.vector.get("recall_at_10"),
        "vector_load": suite.vector,
        "cache_hit_ratio": (suite.cache_figures() or {}).get("hit_ratio"),
        "cache_zipf": suite.cache_figures(),
        "scenarios": medians,
        "rounds": [{name: m.as_dict() for name, m in r.items()} for r in suite.rounds],
        "memory_bytes": suite.memory,
        "tracing_rounds": suite.tracing,
        "scaling": suite.scaling,
        "puts_per_commit": statistics.median(suite.puts_per_commit) if suite.puts_per_commit else None,
    }


def write_results(suite: Suite, config: Config, folder: Path) -> dict[str, Any]:
    """Write latest.json and latest.md into ``folder``; the document written."""
    folder.mkdir(parents=True, exist_ok=True)
    document = results(suite, config)
    (folder / "latest.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    (folder / "latest.md").write_text(markdown(document))
    return document


def markdown(document: dict[str, Any]) -> str:
    """The run as markdown tables."""
    config = document["config"]
    lines = [
        f"# Strata benchmark run, {document['time']}",
        "",
        f"{document['machine']['cpus']} CPUs, Python {document['machine']['python']}. "
        f"{config['rounds']} rounds of {config['duration_s']} s (+{config['warmup_s']} s warm-up) "
        "per scenario; "
        "figures are medians over rounds, ratios are medians of per-round ratios.",
        "",
        "## Ratios",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    for name, value in document["ratios"].items():
        target = TARGETS.get(name)
        shown = "not measured yet" if value is None else f"{value:.2f}"
        verdict = "" if value is None or target is None else (" (met)" if value >= target else " (missed)")
        lines.append(f"| {name} | {shown}{verdict} | {'' if target is None else f'>= {target}'} |")
    added = document["gateway_added_p50_ms"]
    if added is not None:
        verdict = " (met)" if added <= GATEWAY_ADDED_P50_MS else " (missed)"
        lines.append(f"| gateway_added_p50_ms | {added:.3f} ms{verdict} | <= {GATEWAY_ADDED_P50_MS} ms |")
    lines += [
        "",
        "## Scenarios",
        "",
        "| scenario | rps | p50 ms | p99 ms | load generator |",
        "|---|---|---|---|---|",
    ]
    for name, m in document["scenarios"].items():
        lines.append(f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['tool']} |")
    scaling = document.get("scaling")
    if scaling:
        lines += [
            "",
            f"## Scaling: KV Get by process count ({scaling['load']}, {scaling['cores']} cores in all)",
            "",
            "| kv processes | gateway processes | rps | vs one of each |",
            "|---|---|---|---|",
        ]
        for row in scaling["rows"]:
            shape = f"| {row['kv_processes']} | {row['gateway_processes']} "
            lines.append(shape + f"| {row['rps']:.0f} | {row['vs_one_each']:.2f} |")
    cache = document.get("cache_zipf")
    if cache:
        lines += [
            "",
            "## Cache on a Zipf read mix (s = 1.1 over the bench keys)",
            "",
            f"Hit ratio {cache['hit_ratio']:.3f} (target >= 0.95); "
            f"Postgres reads per 1,000 Gets: {cache['postgres_reads_per_1000_gets']:.1f}. "
            f"{cache['first_touch_share']:.3f} of the Gets asked for a key never asked for before "
            "(a miss in any cache); of the Gets for keys asked for before, "
            f"{cache['hit_ratio_of_repeat_keys']:.3f} hit.",
        ]
    load = document.get("vector_load")
    if load:
        lines += [
            "",
            f"## Vectors ({load['points']:.0f} x 128, cosine, HNSW m 16 / ef_construction 64, ef_search 100)",
            "",
            f"Bulk load through the service {load['service_upsert_points_per_s']:.0f} points/s vs raw COPY "
            f"{load['copy_points_per_s']:.0f} points/s into an equally indexed table "
            f"(ratio {load['upsert_vs_copy']:.2f}); recall@10 at defaults {load['recall_at_10']:.3f}.",
        ]
    if document.get("puts_per_commit"):
        lines += ["", f"Group commit under the Put load: {document['puts_per_commit']:.1f} puts per commit."]
    lines += ["", "## Resident memory (MiB)", "", "| process | idle | under load |", "|---|---|---|"]
    memory = document["memory_bytes"]
    for name in sorted(memory.get("idle", {})):
        idle = memory["idle"][name] / 2**20
        loaded = memory.get("under_load", {}).get(name, 0) / 2**20
        lines.append(f"| {name} | {idle:.1f} | {loaded:.1f} |")
    return "\n".join(lines) + "\n"

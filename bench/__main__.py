"""``python -m bench``: start a Strata on embedded backends, run the suite, write the results."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import uvloop

from bench.h2load import h2load_available
from bench.otlp_sink import OtlpSink
from bench.report import write_results
from bench.scaling import scaling_rounds
from bench.stack import ROOT, bench_backends, running_strata
from bench.suite import Config, Suite
from devstack.backends import Backends


async def tracing_rounds(backends: Backends, data_dir: Path, config: Config) -> list[dict[str, float]]:
    """Per round: gateway Get throughput with tracing off, then on (100 % sampled, exported to a sink)."""
    sink = OtlpSink()
    await sink.start()
    rounds: list[dict[str, float]] = []
    try:
        for number in range(1, config.rounds + 1):
            measured: dict[str, float] = {}
            for label, env in (("off", {}), ("on", sink.environment())):
                async with running_strata(backends, data_dir, env) as target:
                    suite = Suite(target, config, backends.migrate_database_url)
                    await suite.prepare_kv()
                    measurement = await suite.scenario("kv_get_gateway")
                    measured[label] = measurement.rps
                    print(
                        f"round {number} kv_get_gateway tracing {label:<3} {measurement.rps:>10.0f} rps",
                        flush=True,
                    )
            rounds.append(measured)
    finally:
        await sink.stop()
    print(f"spans received: {sink.spans} in {sink.requests} exports")
    return rounds


async def main(config: Config, folder: Path) -> int:
    if not h2load_available():
        print("bench: h2load is not installed (Debian package nghttp2-client); `make bench` installs it")
        return 2
    data_dir = ROOT / ".strata" / "bench"
    shutil.rmtree(data_dir, ignore_errors=True)
    async with bench_backends(data_dir) as backends:
        async with running_strata(backends, data_dir) as target:
            suite = Suite(target, config, backends.migrate_database_url)
            await suite.run()
        if config.tracing:
            suite.tracing = await tracing_rounds(backends, data_dir, config)
        if config.scaling:
            suite.scaling = await scaling_rounds(backends, data_dir, config)
    document = write_results(suite, config, folder)
    print(f"\nwritten to {folder}/latest.json and latest.md")
    for name, value in document["ratios"].items():
        print(f"  {name:<24} {'-' if value is None else f'{value:.2f}'}")
    return 0


if __name__ == "__main__":
    # The load workers fork while this process holds gRPC channels; gRPC's note about it is noise here.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=Config.rounds)
    parser.add_argument("--duration", type=float, default=Config.duration_s)
    parser.add_argument("--vectors", type=int, default=Config.vectors, help="points in the vector scenarios")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--no-tracing", action="store_true", help="skip the tracing on/off phase")
    parser.add_argument("--no-scaling", action="store_true", help="skip the kv/gateway process-count phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    config = Config(
        rounds=args.rounds,
        duration_s=args.duration,
        vectors=args.vectors,
        only=frozenset(filter(None, args.only.split(","))),
        tracing=not args.no_tracing,
        scaling=not args.no_scaling,
    )
    sys.exit(uvloop.run(main(config, args.out)))

"""The benchmark harness in a tiny configuration against the e2e stack, so it cannot rot.

Nothing here is timed: it checks that every scenario runs, that h2load's
results are read and checked, and that the results document has its fixed
names.
"""

from __future__ import annotations

import json

import pytest

from bench.report import write_results
from bench.scaling import scaling_rounds
from bench.suite import Config, Suite
from bench.target import Target
from devstack.roles import roles_environment
from tests.conftest import TEST_INTERNAL_SECRET
from tests.support.stack import start_roles

pytestmark = pytest.mark.e2e

TINY = Config(
    rounds=1,
    duration_s=1,
    warmup_s=0,
    connections=1,
    streams=2,
    moderate_streams=1,
    python_processes=1,
    python_concurrency=2,
    keys=50,
    records=30,
    vectors=300,
)


async def test_the_suite_runs_every_scenario_and_writes_its_figures(stack, settings, tmp_path):
    # Every role in one process, beside; unlimited as the bench's own processes are (a 1 s run of
    # a fast gateway passes the stack's 1,000 calls/s a key, and the refusals would fail it).
    env, ports = roles_environment(stack.env, "all")
    env.update(STRATA_RATE_LIMIT_RPS="1000000000", STRATA_RATE_LIMIT_BURST="1000000000")
    one_process = await start_roles(stack, "all", env=env, ports=ports)
    try:
        target = Target(
            ports={**stack.ports, "all": one_process.ports["gateway"]},
            api_key=stack.api_key,
            internal_secret=TEST_INTERNAL_SECRET,
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            pids=stack.launched.pids(),
            one_process_pid=one_process.process.pid,
        )
        suite = Suite(target, TINY, settings.migrate_database_url)
        lines: list[str] = []
        await suite.run(log=lines.append)
    finally:
        await one_process.stop()
    assert len(lines) == len(suite.rounds[0]) == 25  # with the etcd peer (the Makefile installs it)
    document = write_results(suite, TINY, tmp_path)
    assert json.loads((tmp_path / "latest.json").read_text()) == json.loads(json.dumps(document))
    ratios = document["ratios"]
    assert set(ratios) >= {
        "kv_get_direct_vs_echo",
        "kv_get_gateway_vs_echo",
        "batchget_keys_vs_get",
        "put_vs_asyncpg",
        "vector_qps_vs_sql",
        "tracing_on_vs_off",
        "kv_get_vs_etcd_range",
    }
    measured = (
        "kv_get_direct_vs_echo",
        "kv_get_gateway_vs_echo",
        "kv_get_one_process_vs_echo",
        "kv_get_one_process_vs_direct",
        "batchget_keys_vs_get",
        "put_vs_asyncpg",
        "records_get_vs_sql",
        "records_list_vs_sql",
        "kv_get_vs_etcd_range",
        "kv_put_vs_etcd_put",
        "vector_qps_vs_sql",
        "vector_filtered_qps_vs_sql",
    )
    for name in measured:
        assert ratios[name] > 0, name
    assert document["echo_ceiling_rps"] > 0
    assert document["puts_per_commit"] >= 1
    assert 0 < document["recall_at_10"] <= 1
    assert document["vector_load"]["points"] == 300 and document["vector_load"]["upsert_vs_copy"] > 0
    assert 0 < document["cache_hit_ratio"] <= 1
    zipf = document["cache_zipf"]
    # Every Postgres read is a cache miss's (misses of one key at once share a read): never more
    # reads than misses, and fewer than one per Get.
    assert zipf["postgres_reads_per_1000_gets"] <= 1000 * (1 - zipf["hit_ratio"]) + 1e-6
    assert zipf["postgres_reads_per_1000_gets"] < 1000
    for name, scenario in document["scenarios"].items():
        assert scenario["rps"] > 0 and 0 < scenario["p50_ms"] <= scenario["p99_ms"], name
    assert set(document["memory_bytes"]["idle"]) == {"gateway", "kv", "tenants", "vector", "admin"}
    assert document["memory_bytes"]["one_process_idle"]["all"] > 10 * 2**20
    assert document["one_process_added_p50_ms"] is not None
    assert all(size > 10 * 2**20 for size in document["memory_bytes"]["under_load"].values())
    table = (tmp_path / "latest.md").read_text()
    assert "| kv_get_direct_vs_echo |" in table and "| echo |" in table


async def test_the_scaling_phase_measures_each_shape_with_its_processes(backends, tmp_path):
    # Its own launchers on the session's backends: one of each, then two kv and two gateways.
    scaling = await scaling_rounds(
        backends, tmp_path / "data", TINY, shapes=((1, 1), (2, 2)), log=lambda _: None
    )
    assert scaling["cores"] and [(r["kv_processes"], r["gateway_processes"]) for r in scaling["rows"]] == [
        (1, 1),
        (2, 2),
    ]
    assert all(r["rps"] > 0 for r in scaling["rows"]) and scaling["rows"][0]["vs_one_each"] == 1.0

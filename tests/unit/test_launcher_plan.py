"""The launcher's plan of processes: ports, upstream lists and cache tiers per service."""

from __future__ import annotations

from devstack.launcher import service_processes
from shared.config.settings import load_settings


def plan(**env: str) -> dict[str, dict[str, str]]:
    """Each process's label → its environment, for settings read from ``env``."""
    settings = load_settings(env)
    return {process.label: process.env for process in service_processes(settings, dict(env))}


def test_a_service_of_several_processes_reads_through_redis_only():
    processes = plan(STRATA_KV_REPLICAS="2")
    assert processes["kv"]["STRATA_CACHE_LOCAL_ENTRIES"] == "0"
    assert processes["kv-2"]["STRATA_CACHE_LOCAL_ENTRIES"] == "0"
    assert (processes["kv"]["STRATA_KV_PORT"], processes["kv-2"]["STRATA_KV_PORT"]) == ("50061", "50161")
    assert processes["gateway"]["STRATA_KV_UPSTREAMS"] == "127.0.0.1:50061,127.0.0.1:50161"
    # A service of one process keeps its in-process tier: it sees every write to it.
    assert "STRATA_CACHE_LOCAL_ENTRIES" not in processes["tenants"]


def test_a_local_tier_asked_for_by_name_is_kept():
    processes = plan(STRATA_TENANTS_REPLICAS="2", STRATA_CACHE_LOCAL_ENTRIES="500")
    assert processes["tenants"]["STRATA_CACHE_LOCAL_ENTRIES"] == "500"
    assert processes["tenants-2"]["STRATA_CACHE_LOCAL_ENTRIES"] == "500"

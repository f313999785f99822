"""Prometheus metrics of every process of a real stack (STRATA_<NAME>_METRICS_PORT)."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest
from strata.kv.v1 import kv_pb2

pytestmark = pytest.mark.e2e

PROCESSES = ("gateway", "kv", "tenants", "vector", "admin")


async def scrape(stack, process: str) -> str:
    port = stack.env[f"STRATA_{process.upper()}_METRICS_PORT"]

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    return await asyncio.to_thread(fetch)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (0 when absent)."""
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match[1] for k, v in labels.items()):
            return float(match[2])
    return 0.0


async def test_every_process_counts_and_times_rpcs_by_method_and_code(
    stack, gw_kv, admin_metadata, namespace
):
    put = {"grpc_service": "strata.kv.v1.KvService", "grpc_method": "Put"}
    before = {
        p: sample(await scrape(stack, p), "grpc_server_handled_total", **put, grpc_code="OK")
        for p in ("gateway", "kv")
    }
    for i in range(3):
        await gw_kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key=f"k{i}", value=b"v"), metadata=admin_metadata
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"), metadata=admin_metadata)
    for process in ("gateway", "kv"):
        text = await scrape(stack, process)
        assert sample(text, "grpc_server_handled_total", **put, grpc_code="OK") == before[process] + 3, (
            process
        )
        get = {"grpc_service": "strata.kv.v1.KvService", "grpc_method": "Get"}
        assert sample(text, "grpc_server_handled_total", **get, grpc_code="NOT_FOUND") >= 1, process
        assert sample(text, "grpc_server_handling_seconds_count", **put) >= 3
        assert sample(text, "grpc_server_handling_seconds_bucket", **put, le="+Inf") >= 3
        assert sample(text, "grpc_server_started_total", **put) >= 3
    for process in PROCESSES:
        text = await scrape(stack, process)
        assert "strata_calls_in_flight" in text, process
        if process != "gateway":
            assert sample(text, "strata_pool_max_size", component=process) >= 1, process
    kv = await scrape(stack, "kv")
    assert sample(kv, "strata_cache_misses_total", component="kv") >= 1
    assert "strata_cache_local_entries" in kv

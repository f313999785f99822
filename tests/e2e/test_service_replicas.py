"""Several processes per service (STRATA_KV_REPLICAS, STRATA_GATEWAY_REPLICAS) behind one gateway.

One launcher with two kv processes and two gateway processes, on the session's
backends. Caches, invalidations and watches must hold across the kv processes
(each has its own local cache tier), and losing one process under load may
fail only the calls it was running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from shared.api.callers import Caller
from tests.chaos import Load, provision_tenant
from tests.conftest import signed_channel
from tests.support.calls import AdminStubs
from tests.support.stack import Stack, remove_data, start_stack

pytestmark = pytest.mark.e2e

CALLER = Caller("replicas-tenant", frozenset({"kv:read", "kv:write"}), "replicas-key")


@pytest.fixture(scope="module")
async def replicated(settings) -> AsyncIterator[Stack]:
    stack = await start_stack(
        settings,
        STRATA_KV_REPLICAS="2",
        STRATA_GATEWAY_REPLICAS="2",
        STRATA_RATE_LIMIT_RPS="100000",
        STRATA_RATE_LIMIT_BURST="100000",
    )
    yield stack
    await stack.stop()
    remove_data(stack)


def _kv_ports(stack: Stack) -> list[int]:
    return [stack.ports["kv"], stack.ports["kv"] + 100]


async def test_every_process_runs_serves_and_is_checked_by_admin(replicated):
    pids = replicated.launched.all_pids()
    assert len(pids["kv"]) == 2 and len(pids["gateway"]) == 2
    assert len(pids["tenants"]) == len(pids["vector"]) == len(pids["admin"]) == 1
    assert any(line.strip().startswith("kv-2 ") for line in replicated.output)
    for port in _kv_ports(replicated):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(replicated.gateway) as channel:
        health = await AdminStubs(channel).GetSystemHealth(
            admin_pb2.GetSystemHealthRequest(), metadata=(("authorization", f"Bearer {replicated.api_key}"),)
        )
    checked = {c.address for c in health.components if c.component == "kv"}
    assert checked == {f"127.0.0.1:{port}" for port in _kv_ports(replicated)}
    assert health.status == admin_pb2.SERVING_STATUS_SERVING, health.reasons


async def test_a_write_on_one_process_is_read_on_the_other_at_once(replicated):
    first, second = _kv_ports(replicated)
    namespace = f"x-{uuid.uuid4().hex[:8]}"
    async with signed_channel(first, CALLER) as a, signed_channel(second, CALLER) as b:
        one, other = kv_pb2_grpc.KvServiceStub(a), kv_pb2_grpc.KvServiceStub(b)
        # Both processes hold the key in their local tier before the writes start.
        await one.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"0"), timeout=5)
        for stub in (one, other):
            assert (
                await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=5)
            ).kv.value == b"0"
        for i in range(1, 301):
            writer, reader = (one, other) if i % 2 else (other, one)
            await writer.Put(
                kv_pb2.PutRequest(namespace=namespace, key="k", value=str(i).encode()), timeout=5
            )
            got = await reader.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=5)
            assert got.kv.value == str(i).encode(), f"write {i}: the other process answered {got.kv.value!r}"
        await one.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="k"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_watch_on_one_process_sees_the_writes_made_on_the_other(replicated):
    first, second = _kv_ports(replicated)
    namespace = f"w-{uuid.uuid4().hex[:8]}"
    async with signed_channel(first, CALLER) as a, signed_channel(second, CALLER) as b:
        watch = kv_pb2_grpc.KvServiceStub(b).Watch(
            kv_pb2.WatchRequest(namespace=namespace, prefix="p/"), timeout=30
        )
        created = await watch.read()
        assert created.created
        for i in range(5):
            await kv_pb2_grpc.KvServiceStub(a).Put(
                kv_pb2.PutRequest(namespace=namespace, key=f"p/{i}", value=b"v"), timeout=5
            )
        seen: list[str] = []
        while len(seen) < 5:
            message = await asyncio.wait_for(watch.read(), 10)
            seen.extend(event.kv.key for event in message.events)
        watch.cancel()
    assert seen == [f"p/{i}" for i in range(5)]


async def test_killing_one_kv_process_under_load_fails_only_the_calls_it_was_running(replicated):
    metadata = await provision_tenant(replicated, f"rk-{uuid.uuid4().hex[:6]}")
    async with Load(replicated.gateway, metadata, f"kill-{uuid.uuid4().hex[:6]}", workers=8) as load:
        await asyncio.sleep(1.5)
        before = load.ledger.codes.copy()
        victim = replicated.launched.all_pids()["kv"][1]
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(3.0)
    failed = sum(n for code, n in load.ledger.codes.items() if code != "OK") - sum(
        n for code, n in before.items() if code != "OK"
    )
    # At most one call per worker was on the killed process when it died; the gateway
    # sends the calls that could not reach it to the other one.
    assert failed <= load.workers, load.ledger.failures
    assert load.ledger.stale_reads == []
    assert load.ledger.codes["OK"] - before["OK"] > 100
    # The launcher started another; both serve again.
    for _ in range(100):
        if len(replicated.launched.all_pids().get("kv", [])) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(replicated.launched.all_pids()["kv"]) == 2

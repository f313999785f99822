"""Limits that keep a busy process answering: pool exhaustion, calls in flight, streams per connection.

Each answers at once with a clear status (or holds the excess on the
client's side) instead of letting work pile up inside the process until
every caller's deadline. The per-call statement timeout is in test_database.py.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc
import pytest
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from services.kv.app import build_kv_server
from shared.api.errors import Code, StrataError
from shared.rpc.identity import signing_interceptors
from shared.storage.db import Database
from tests.conftest import TENANT, TEST_INTERNAL_SECRET, signed_channel
from tests.support.errors import error_info


async def test_an_exhausted_pool_answers_unavailable_at_once_and_recovers(settings):
    db = await Database.open(settings.database_url, min_size=1, max_size=1, acquire_timeout=0.3)
    try:
        async with db.transaction() as held:
            await held.execute("SELECT 1")
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(db.fetchval("SELECT 1", timeout=10) for _ in range(20)), return_exceptions=True
            )
            waited = time.monotonic() - started
        assert all(isinstance(o, StrataError) for o in outcomes), outcomes
        assert {(o.code, o.reason) for o in outcomes} == {  # type: ignore[union-attr]
            (Code.UNAVAILABLE, "DATABASE_POOL_EXHAUSTED")
        }
        # Twenty callers with 10 s deadlines were all answered within the acquire bound, together.
        assert waited < 2.0, waited
        assert await db.fetchval("SELECT 1", timeout=10) == 1
    finally:
        await db.close()


async def test_a_call_whose_own_deadline_is_shorter_keeps_its_deadline_answer(settings):
    db = await Database.open(settings.database_url, min_size=1, max_size=1, acquire_timeout=5.0)
    try:
        async with db.transaction():
            with pytest.raises(TimeoutError):
                await db.fetchval("SELECT 1", timeout=0.2)
    finally:
        await db.close()


@pytest.fixture
async def limited_kv(settings):
    """A KV server that serves 2 calls at once in all, and 3 streams per connection."""
    server = await build_kv_server(replace(settings, max_calls_in_flight=2, max_concurrent_streams=3))
    await server.start(0)
    yield server
    await server.stop(grace=1.0)


async def _watching(stub: kv_pb2_grpc.KvServiceStub, namespace: str):
    stream = stub.Watch(kv_pb2.WatchRequest(namespace=namespace, key="k"))
    assert (await stream.read()).created
    return stream


async def test_calls_past_the_in_flight_limit_are_refused_at_once(limited_kv, namespace):
    async with signed_channel(limited_kv.port, TENANT) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        watches = [await _watching(stub, namespace) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=10)
        assert time.monotonic() - started < 1.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused.value).reason == "OVERLOADED"
        watches[0].cancel()
        await asyncio.sleep(0.2)  # the server sees the cancellation and lets the call go
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # admitted now: a normal answer
        watches[1].cancel()


async def test_streams_past_the_per_connection_limit_wait_on_the_client(settings, namespace):
    server = await build_kv_server(replace(settings, max_concurrent_streams=2))
    await server.start(0)
    try:
        # Its own subchannel pool: otherwise channels to one address share one connection.
        other = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[("grpc.use_local_subchannel_pool", 1)],
            interceptors=signing_interceptors(TEST_INTERNAL_SECRET.encode(), TENANT),
        )
        async with signed_channel(server.port, TENANT) as one, other:
            stub = kv_pb2_grpc.KvServiceStub(one)
            watches = [await _watching(stub, namespace) for _ in range(2)]
            # A third stream on the same connection is not opened until one ends ...
            with pytest.raises(grpc.aio.AioRpcError) as waited:
                await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=0.5)
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # ... while another connection is served as usual.
            with pytest.raises(grpc.aio.AioRpcError) as served:
                await kv_pb2_grpc.KvServiceStub(other).Get(
                    kv_pb2.GetRequest(namespace=namespace, key="k"), timeout=5
                )
            assert served.value.code() == grpc.StatusCode.NOT_FOUND
            for watch in watches:
                watch.cancel()
    finally:
        await server.stop(grace=1.0)

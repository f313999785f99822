"""Faults under the KV service: Redis gone, Postgres restarted."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from strata.kv.v1 import kv_pb2

from devstack.redis import EmbeddedRedis
from shared.cache.redisclient import open_redis
from tests.support.errors import error_info


@pytest.fixture
def embedded(backends):
    if backends.redis is None or backends.postgres is None:
        pytest.skip("needs the embedded servers to kill and restart them")
    return backends


async def retry_until_ok(call, request, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_kv_keeps_working_while_redis_is_killed_and_after_it_returns(kv, namespace, embedded):
    redis: EmbeddedRedis = embedded.redis
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"before"))
    redis.kill()
    try:
        for i in range(20):
            await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=f"during-{i}".encode()))
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
            assert got.kv.value == f"during-{i}".encode()
        listed = await kv.List(kv_pb2.ListRequest(namespace=namespace))
        assert [k.value for k in listed.kvs] == [b"during-19"]
    finally:
        redis.start()
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"after"))
    for _ in range(3):
        got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
        assert got.kv.value == b"after"


async def test_kv_recovers_after_postgres_restarts(kv, namespace, embedded):
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"before"))
    embedded.postgres.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"lost"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        embedded.postgres.start()
    await retry_until_ok(kv.Put, kv_pb2.PutRequest(namespace=namespace, key="first", value=b"back"))
    # Once one call gets through, the pool has dropped every stale connection:
    # no later call fails (no breaker flapping, no dead connection per call).
    for i in range(30):
        await kv.Put(kv_pb2.PutRequest(namespace=namespace, key=f"n{i}", value=b"x"))
    written = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"after"))
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"after" and got.kv.mod_revision == written.header.revision
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, prefix="k"))
    assert [k.value for k in listed.kvs] == [b"after"]


async def test_watch_reports_where_to_resume_when_postgres_goes_away(kv, namespace, embedded):
    first = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"1"))
    stream = kv.Watch(kv_pb2.WatchRequest(namespace=namespace, key="k", start_revision=first.header.revision))
    assert (await stream.read()).created
    assert (await stream.read()).events[0].kv.value == b"1"
    embedded.postgres.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                response = await asyncio.wait_for(stream.read(), 30)
                assert response is not grpc.aio.EOF
    finally:
        embedded.postgres.start()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    resume = int(error_info(caught.value).metadata["resume_revision"])
    assert resume > first.header.revision
    second = await retry_until_ok(kv.Put, kv_pb2.PutRequest(namespace=namespace, key="k", value=b"2"))
    assert resume <= second.header.revision
    resumed = kv.Watch(kv_pb2.WatchRequest(namespace=namespace, key="k", start_revision=resume))
    assert (await resumed.read()).created
    events = (await asyncio.wait_for(resumed.read(), 10)).events
    resumed.cancel()
    assert [(e.kv.value, e.kv.mod_revision) for e in events] == [(b"2", second.header.revision)]


async def test_redis_flushed_again_and_again_never_serves_a_value_older_than_an_acknowledged_write(
    kv, namespace, settings
):
    redis = open_redis(settings.redis_url)
    acknowledged = 0  # the revision of the newest acknowledged Put
    stale: list[tuple[int, int]] = []
    done = asyncio.Event()
    flushes = 0

    async def flush() -> None:
        nonlocal flushes
        while not done.is_set():
            await redis.flushall()
            flushes += 1
            await asyncio.sleep(0.003)

    async def read() -> None:
        while not done.is_set():
            floor = acknowledged
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
            if got.kv.mod_revision < floor:
                stale.append((got.kv.mod_revision, floor))

    first = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"0"))
    acknowledged = first.header.revision
    tasks = [asyncio.create_task(flush()), *(asyncio.create_task(read()) for _ in range(6))]
    try:
        for i in range(1, 201):
            written = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=str(i).encode()))
            acknowledged = written.header.revision
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
            assert (got.kv.value, got.kv.mod_revision) == (str(i).encode(), written.header.revision)
    finally:
        done.set()
        await asyncio.gather(*tasks)
        await redis.aclose()
    assert flushes > 10  # the flushes really ran between the writes
    assert stale == []

"""Concurrent writers: compare-and-set, revision order, read-after-ack."""

from __future__ import annotations

import asyncio
import random

import grpc
from strata.kv.v1 import kv_pb2


async def test_fifty_concurrent_compare_and_set_increments_end_at_fifty(kv, namespace):
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="counter", value=b"0"))
    conflicts = 0

    async def increment() -> None:
        nonlocal conflicts
        while True:
            current = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="counter"))
            value = int(current.kv.value) + 1
            try:
                await kv.Put(
                    kv_pb2.PutRequest(
                        namespace=namespace,
                        key="counter",
                        value=str(value).encode(),
                        if_revision=current.kv.mod_revision,
                    )
                )
                return
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED
                conflicts += 1

    await asyncio.gather(*(increment() for _ in range(50)))
    final = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="counter"))
    assert final.kv.value == b"50"
    assert final.kv.version == 51
    assert conflicts > 0, "the writers never raced; the test proves nothing"


async def test_concurrent_creates_with_if_revision_zero_have_one_winner(kv, namespace):
    async def create(i: int) -> bool:
        try:
            await kv.Put(
                kv_pb2.PutRequest(namespace=namespace, key="lock", value=str(i).encode(), if_revision=0)
            )
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED
            return False

    results = await asyncio.gather(*(create(i) for i in range(30)))
    assert results.count(True) == 1
    winner = results.index(True)
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="lock"))
    assert got.kv.value == str(winner).encode() and got.kv.version == 1


async def test_watcher_sees_every_revision_of_concurrent_writers_exactly_once(kv, namespace):
    stream = kv.Watch(kv_pb2.WatchRequest(namespace=namespace, prefix=""))
    assert (await stream.read()).created
    writers, per_writer = 20, 15

    async def writer(w: int) -> list[int]:
        acked = []
        for i in range(per_writer):
            response = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key=f"w{w}/{i}", value=b"x"))
            acked.append(response.header.revision)
        return acked

    acked = [r for rs in await asyncio.gather(*(writer(w) for w in range(writers))) for r in rs]
    seen: list[int] = []

    async def read() -> None:
        while len(seen) < len(acked):
            response = await stream.read()
            assert response is not grpc.aio.EOF
            seen.extend(e.kv.mod_revision for e in response.events)

    await asyncio.wait_for(read(), 20)
    stream.cancel()
    assert seen == sorted(seen), "events out of revision order"
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert sorted(acked) == seen, "an acknowledged write was never delivered"


async def test_reader_never_sees_older_value_after_ack_under_concurrent_reads(kv, namespace):
    """The cache-fill race: readers filling the cache while a writer commits must not leave stale data."""
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"0"))
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
            await asyncio.sleep(random.random() / 1000)

    readers = [asyncio.create_task(reader()) for _ in range(8)]
    try:
        for i in range(1, 150):
            await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=str(i).encode()))
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
            assert got.kv.value == str(i).encode(), f"read {got.kv.value!r} after acknowledging {i}"
    finally:
        stop.set()
        await asyncio.gather(*readers)

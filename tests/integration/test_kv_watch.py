"""KvService.Watch: order, filters, resume, expiry events, compaction."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from services.kv import sweeper
from services.kv.app import build_kv_server
from tests.conftest import TENANT, signed_channel
from tests.support.errors import error_info

PUT, DELETE, EXPIRE = kv_pb2.EVENT_TYPE_PUT, kv_pb2.EVENT_TYPE_DELETE, kv_pb2.EVENT_TYPE_EXPIRE


async def collect(stream, count: int, timeout: float = 10.0) -> list[kv_pb2.Event]:
    """The first ``count`` events of ``stream`` (skipping the created message)."""
    events: list[kv_pb2.Event] = []

    async def read() -> None:
        while len(events) < count:
            response = await stream.read()
            assert response is not grpc.aio.EOF, "stream ended early"
            events.extend(response.events)

    await asyncio.wait_for(read(), timeout)
    return events


async def open_watch(kv, **fields):
    stream = kv.Watch(kv_pb2.WatchRequest(**fields))
    created = await asyncio.wait_for(stream.read(), 10)
    assert created.created and not created.events
    return stream, created


async def test_watch_from_now_sees_later_puts_and_deletes_in_order(kv, namespace):
    stream, created = await open_watch(kv, namespace=namespace, prefix="")
    first = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="a", value=b"1"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="b", value=b"2"))
    await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="a"))
    events = await collect(stream, 3)
    stream.cancel()
    assert [(e.type, e.kv.key) for e in events] == [(PUT, "a"), (PUT, "b"), (DELETE, "a")]
    assert events[0].kv.value == b"1" and events[0].kv.mod_revision == first.header.revision
    revisions = [e.kv.mod_revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] > created.header.revision


async def test_watch_of_one_key_ignores_other_keys(kv, namespace):
    stream, _ = await open_watch(kv, namespace=namespace, key="x")
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="xy", value=b"no"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="y", value=b"no"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="x", value=b"yes"))
    events = await collect(stream, 1)
    stream.cancel()
    assert [(e.kv.key, e.kv.value) for e in events] == [("x", b"yes")]


async def test_watch_of_prefix_ignores_other_namespaces(kv, namespace):
    stream, _ = await open_watch(kv, namespace=namespace, prefix="p/")
    await kv.Put(kv_pb2.PutRequest(namespace=namespace + "-2", key="p/1", value=b"other ns"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="q/1", value=b"other prefix"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="p/1", value=b"mine"))
    events = await collect(stream, 1)
    stream.cancel()
    assert [(e.kv.namespace, e.kv.value) for e in events] == [(namespace, b"mine")]


async def test_watch_resumes_from_a_past_revision(kv, namespace):
    revisions = []
    for i in range(5):
        response = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key=f"k{i}", value=str(i).encode()))
        revisions.append(response.header.revision)
    stream, _ = await open_watch(kv, namespace=namespace, prefix="", start_revision=revisions[2])
    events = await collect(stream, 3)
    stream.cancel()
    assert [e.kv.mod_revision for e in events] == revisions[2:]
    assert [e.kv.key for e in events] == ["k2", "k3", "k4"]


async def test_batch_put_events_share_one_revision_and_all_arrive(kv, namespace):
    stream, _ = await open_watch(kv, namespace=namespace, prefix="")
    items = [kv_pb2.BatchPutItem(key=f"k{i:04d}", value=b"v") for i in range(1000)]
    response = await kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))
    events = await collect(stream, 1000, timeout=20)
    stream.cancel()
    assert len(events) == 1000
    assert {e.kv.mod_revision for e in events} == {response.header.revision}
    assert [e.kv.key for e in events] == [f"k{i:04d}" for i in range(1000)]


async def test_expiry_is_delivered_as_an_expire_event(kv, namespace):
    stream, _ = await open_watch(kv, namespace=namespace, key="k")
    await kv.Put(
        kv_pb2.PutRequest(
            namespace=namespace, key="k", value=b"v", ttl=duration_pb2.Duration(nanos=100_000_000)
        )
    )
    events = await collect(stream, 2, timeout=15)
    stream.cancel()
    assert [e.type for e in events] == [PUT, EXPIRE]
    assert events[1].kv.mod_revision > events[0].kv.mod_revision


async def test_watch_below_the_compacted_revision_is_out_of_range(kv, namespace, settings):
    old = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"))
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v2"))
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        await conn.execute("SELECT kv.compact($1)", old.header.revision)
    finally:
        await conn.close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await open_watch(kv, namespace=namespace, key="k", start_revision=old.header.revision)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert info.reason == "REVISION_COMPACTED"
    assert int(info.metadata["compact_revision"]) >= old.header.revision
    # The first revision after the compaction point is still served.
    stream, _ = await open_watch(kv, namespace=namespace, key="k", start_revision=old.header.revision + 1)
    events = await collect(stream, 1)
    stream.cancel()
    assert events[0].kv.value == b"v2"


async def test_watch_without_target_is_invalid_argument(kv, namespace):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await open_watch(kv, namespace=namespace)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_with_negative_start_revision_is_invalid_argument(kv, namespace):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await open_watch(kv, namespace=namespace, prefix="", start_revision=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_sweeper_compacts_the_change_log_by_itself(settings, monkeypatch):
    # A kv server of its own that keeps 10 revisions of history and compacts every 0.2 s.
    monkeypatch.setattr(sweeper, "_COMPACT_EVERY_S", 0.2)
    server = await build_kv_server(dataclasses.replace(settings, kv_history_revisions=10))
    await server.start(0)
    namespace = f"compact-{uuid.uuid4().hex[:8]}"
    try:
        async with signed_channel(server.port, TENANT) as channel:
            kv = kv_pb2_grpc.KvServiceStub(channel)
            first = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"0"))
            for i in range(1, 30):
                last = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=str(i).encode()))
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    stream, _ = await open_watch(
                        kv, namespace=namespace, key="k", start_revision=first.header.revision
                    )
                except grpc.aio.AioRpcError as exc:
                    caught = exc
                    break
                stream.cancel()
                assert asyncio.get_running_loop().time() < deadline, "history never compacted"
                await asyncio.sleep(0.1)
            assert caught.code() == grpc.StatusCode.OUT_OF_RANGE
            info = error_info(caught)
            assert info.reason == "REVISION_COMPACTED"
            compacted = int(info.metadata["compact_revision"])
            # Ten revisions are kept behind the newest (an expiry sweep elsewhere may add one).
            assert first.header.revision <= compacted < last.header.revision - 5
            stream, _ = await open_watch(
                kv, namespace=namespace, key="k", start_revision=last.header.revision - 4
            )
            events = await collect(stream, 5)
            stream.cancel()
            assert [e.kv.value for e in events] == [str(i).encode() for i in range(25, 30)]
    finally:
        await server.stop(grace=1.0)

"""Answers never outgrow the message limit by surprise: refused from the request when they must,
cut or stopped as they are built when only the data can tell.

Real processes: a vector process of its own (so its memory is its own to
measure) behind a gateway of its own; KV through the session's gateway.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from tests.support.calls import bearer, every_page
from tests.support.errors import error_info, field_violations
from tests.support.stack import start_gateway, start_process, stop_process

DIMENSION = 2000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def large_channel(stack) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the session's gateway that takes messages up to the servers' limit (8 MiB)."""
    limit = 8 * 1024 * 1024 + 64 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    async with grpc.aio.insecure_channel(stack.gateway, options=options) as channel:
        yield channel


def unit_vector(rng: random.Random) -> vector_pb2.Vector:
    return vector_pb2.Vector(values=[rng.uniform(-1, 1) for _ in range(DIMENSION)])


async def test_a_search_batch_whose_vectors_cannot_fit_is_refused_before_any_work(stack, make_key):
    vector, vector_port = await start_process(stack, "vector")
    gateway, port = await start_gateway(stack, STRATA_VECTOR_UPSTREAMS=f"127.0.0.1:{vector_port}")
    try:
        api_key, _ = await make_key(f"big-{uuid.uuid4().hex[:8]}", "vector:read", "vector:write")
        md = bearer(api_key)
        rng = random.Random(7)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vector_pb2_grpc.VectorServiceStub(channel)
            await stub.CreateCollection(
                vector_pb2.CreateCollectionRequest(
                    collection=vector_pb2.Collection(
                        name="big",
                        dimension=DIMENSION,
                        metric=vector_pb2.METRIC_L2,
                        none=vector_pb2.NoIndex(),
                    )
                ),
                metadata=md,
            )
            for batch in range(3):  # 900 points of 8 kB each
                points = [vector_pb2.Point(id=f"p{batch}-{i}", vector=unit_vector(rng)) for i in range(300)]
                await stub.UpsertPoints(
                    vector_pb2.UpsertPointsRequest(collection="big", points=points), metadata=md
                )
            query = unit_vector(rng)
            before = rss_mib(vector.pid)
            searches = [
                vector_pb2.SearchRequest(collection="big", vector=query, limit=1000, with_vectors=True)
                for _ in range(100)
            ]
            with_vectors = stub.SearchBatch(vector_pb2.SearchBatchRequest(searches=searches), metadata=md)
            try:
                await with_vectors
                raise AssertionError("answered")
            except grpc.aio.AioRpcError as exc:
                error = exc
            grown = rss_mib(vector.pid) - before
            # The same searches without the vectors are fine.
            for search in searches[:3]:
                search.with_vectors = False
            small = await stub.SearchBatch(vector_pb2.SearchBatchRequest(searches=searches[:3]), metadata=md)
    finally:
        await stop_process(gateway)
        await stop_process(vector)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "searches" in field_violations(error)
    assert "message limit" in field_violations(error)["searches"]
    assert grown < 30, f"vector grew {grown:.0f} MiB for a refused call"  # before: hundreds
    assert [len(result.hits) for result in small.results] == [900, 900, 900]


async def test_a_search_batch_stops_at_the_first_search_its_payloads_push_past_the_limit(
    large_channel, make_key
):
    gw_vector = vector_pb2_grpc.VectorServiceStub(large_channel)
    api_key, _ = await make_key(f"pay-{uuid.uuid4().hex[:8]}", "vector:read", "vector:write")
    md = bearer(api_key)
    await gw_vector.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name="heavy", dimension=2, metric=vector_pb2.METRIC_L2)
        ),
        metadata=md,
    )
    filler = struct_pb2.Struct()
    filler.update({"blob": "x" * 60_000})
    for batch in range(4):  # 100 points with 60 kB payloads: 6 MB per search of 100
        points = [
            vector_pb2.Point(
                id=f"p{batch}-{i}", vector=vector_pb2.Vector(values=[1.0, i + 1.0]), payload=filler
            )
            for i in range(25)
        ]
        await gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="heavy", points=points), metadata=md
        )
    search = vector_pb2.SearchRequest(
        collection="heavy", vector=vector_pb2.Vector(values=[1.0, 1.0]), limit=100, with_payload=True
    )
    one = await gw_vector.SearchBatch(vector_pb2.SearchBatchRequest(searches=[search]), metadata=md)
    assert len(one.results[0].hits) == 100
    try:
        await gw_vector.SearchBatch(vector_pb2.SearchBatchRequest(searches=[search] * 10), metadata=md)
        raise AssertionError("answered")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(exc)
        assert info.reason == "RESPONSE_TOO_LARGE"
        assert info.metadata["field"] == "searches[1].limit"  # stopped there, not after all ten


async def test_watchers_get_values_larger_together_than_one_message_in_several(large_channel, admin_metadata):
    gw_kv = kv_pb2_grpc.KvServiceStub(large_channel)
    # Before: ten 1 MiB values made one 10 MiB message, over the 8 MiB limit, and every watcher
    # that started before them failed on it at every retry.
    namespace = f"large-{uuid.uuid4().hex[:8]}"
    watch = gw_kv.Watch(kv_pb2.WatchRequest(namespace=namespace, prefix=""), metadata=admin_metadata)
    assert (await watch.read()).created
    values = {f"v{i}": os.urandom(1024 * 1024) for i in range(10)}
    for half in (list(values)[:5], list(values)[5:]):
        await gw_kv.BatchPut(
            kv_pb2.BatchPutRequest(
                namespace=namespace, items=[kv_pb2.BatchPutItem(key=k, value=values[k]) for k in half]
            ),
            metadata=admin_metadata,
        )
    received: dict[str, bytes] = {}
    messages = 0
    while len(received) < len(values):
        response = await asyncio.wait_for(watch.read(), 30)
        assert response is not grpc.aio.EOF
        messages += 1
        received.update({event.kv.key: event.kv.value for event in response.events})
    watch.cancel()
    assert received == values
    assert messages >= 2


async def test_point_reads_whose_vectors_cannot_fit_are_refused_from_the_request(gw_vector, make_key):
    api_key, _ = await make_key(f"wide-{uuid.uuid4().hex[:8]}", "vector:read", "vector:write")
    md = bearer(api_key)
    await gw_vector.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(
                name="wide", dimension=4096, metric=vector_pb2.METRIC_L2, none=vector_pb2.NoIndex()
            )
        ),
        metadata=md,
    )
    ids = [f"p{i}" for i in range(1000)]  # 1,000 vectors of 16 kB: 16 MB, over the 8 MiB limit
    for call, field in (
        (
            gw_vector.GetPoints(
                vector_pb2.GetPointsRequest(collection="wide", ids=ids, with_vectors=True), metadata=md
            ),
            "ids",
        ),
        (
            gw_vector.ScrollPoints(
                vector_pb2.ScrollPointsRequest(collection="wide", page_size=1000, with_vectors=True),
                metadata=md,
            ),
            "page_size",
        ),
    ):
        try:
            await call
            raise AssertionError("answered")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert "message limit" in field_violations(exc)[field]
    # Without the vectors, the same reads are fine.
    got = await gw_vector.GetPoints(vector_pb2.GetPointsRequest(collection="wide", ids=ids), metadata=md)
    assert len(got.missing_ids) == 1000
    await gw_vector.ScrollPoints(
        vector_pb2.ScrollPointsRequest(collection="wide", page_size=1000), metadata=md
    )


# -- pages cut by bytes, reads refused before their rows are sent --------------------

MESSAGE_LIMIT = 8 * 1024 * 1024


async def test_a_kv_page_of_large_values_ends_where_the_message_would_be_full(large_channel, admin_metadata):
    gw_kv = kv_pb2_grpc.KvServiceStub(large_channel)
    namespace = f"pages-{uuid.uuid4().hex[:8]}"
    value = os.urandom(1_000_000)
    keys = [f"k{i:02}" for i in range(12)]  # 12 MB: more than one answer holds
    for key in keys:
        await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=value), metadata=admin_metadata)
    # Before: one page of 100 was read whole and refused by gRPC ("larger than max"), at every retry.
    pages = await every_page(
        lambda token: gw_kv.List(
            kv_pb2.ListRequest(namespace=namespace, prefix="", page_size=100, page_token=token),
            metadata=admin_metadata,
        )
    )
    listed = [kv.key for page in pages for kv in page.kvs]
    assert all(kv.value == value for page in pages for kv in page.kvs)
    assert listed == keys  # in order, none twice, none lost
    assert len(pages) == 2 and all(0 < p.ByteSize() <= MESSAGE_LIMIT for p in pages)
    names = await gw_kv.List(
        kv_pb2.ListRequest(namespace=namespace, prefix="", page_size=100, keys_only=True),
        metadata=admin_metadata,
    )
    assert [kv.key for kv in names.kvs] == keys and not names.next_page_token


async def test_a_batch_get_that_cannot_fit_is_refused_from_the_cache_and_from_the_database(
    large_channel, gw_admin, admin_metadata
):
    gw_kv = kv_pb2_grpc.KvServiceStub(large_channel)
    namespace = f"batch-{uuid.uuid4().hex[:8]}"
    value = os.urandom(1_000_000)
    keys = [f"k{i:02}" for i in range(12)]
    for key in keys:
        await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=value), metadata=admin_metadata)
    for cached in (True, False):  # written through to the cache; then read from Postgres
        if not cached:
            await gw_admin.InvalidateCache(
                admin_pb2.InvalidateCacheRequest(service="kv", tenant="dev", group=namespace),
                metadata=admin_metadata,
            )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw_kv.BatchGet(
                kv_pb2.BatchGetRequest(namespace=namespace, keys=keys), metadata=admin_metadata
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, cached
        info = error_info(caught.value)
        assert (info.reason, info.metadata["field"]) == ("RESPONSE_TOO_LARGE", "keys"), cached
    some = await gw_kv.BatchGet(
        kv_pb2.BatchGetRequest(namespace=namespace, keys=keys[:5]), metadata=admin_metadata
    )
    assert [kv.key for kv in some.kvs] == keys[:5] and all(kv.value == value for kv in some.kvs)


async def test_a_records_page_of_large_documents_ends_where_the_message_would_be_full(
    large_channel, make_key
):
    records = tenants_pb2_grpc.RecordServiceStub(large_channel)
    api_key, _ = await make_key(f"docs-{uuid.uuid4().hex[:8]}", "tenants:read", "tenants:write")
    md = bearer(api_key)
    data = struct_pb2.Struct()
    data.update({"blob": "y" * 900_000})
    ids = [f"r{i:02}" for i in range(12)]
    for record_id in ids:
        await records.CreateRecord(
            tenants_pb2.CreateRecordRequest(
                record=tenants_pb2.Record(collection="big", id=record_id, data=data)
            ),
            metadata=md,
        )
    pages = await every_page(
        lambda token: records.ListRecords(
            tenants_pb2.ListRecordsRequest(collection="big", order_by="id", page_size=100, page_token=token),
            metadata=md,
        )
    )
    assert all(page.ByteSize() <= MESSAGE_LIMIT for page in pages)
    assert [r.id for page in pages for r in page.records] == ids and len(pages) == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await records.BatchGetRecords(
            tenants_pb2.BatchGetRecordsRequest(collection="big", ids=ids), metadata=md
        )
    info = error_info(caught.value)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (info.reason, info.metadata["field"]) == ("RESPONSE_TOO_LARGE", "ids")
    some = await records.BatchGetRecords(
        tenants_pb2.BatchGetRecordsRequest(collection="big", ids=ids[:5]), metadata=md
    )
    assert [r.id for r in some.records] == ids[:5]


@pytest.fixture
async def heavy_points(large_channel, make_key) -> tuple[vector_pb2_grpc.VectorServiceStub, tuple]:
    """A collection of 70 points whose payload and text (60 kB each) make 8.4 MB together."""
    stub = vector_pb2_grpc.VectorServiceStub(large_channel)
    api_key, _ = await make_key(f"heavy-{uuid.uuid4().hex[:8]}", "vector:read", "vector:write")
    md = bearer(api_key)
    await stub.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name="heavy", dimension=2, metric=vector_pb2.METRIC_L2)
        ),
        metadata=md,
    )
    payload = struct_pb2.Struct()
    payload.update({"blob": "p" * 60_000})
    for batch in range(2):
        points = [
            vector_pb2.Point(
                id=f"p{35 * batch + i:02}",
                vector=vector_pb2.Vector(values=[1.0, float(35 * batch + i)]),
                payload=payload,
                text="word " * 12_000,
            )
            for i in range(35)
        ]
        await stub.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="heavy", points=points), metadata=md
        )
    return stub, md


async def test_a_scroll_page_of_heavy_points_ends_where_the_message_would_be_full(heavy_points):
    stub, md = heavy_points
    pages = await every_page(
        lambda token: stub.ScrollPoints(
            vector_pb2.ScrollPointsRequest(
                collection="heavy", page_size=100, with_payload=True, page_token=token
            ),
            metadata=md,
        )
    )
    assert all(page.ByteSize() <= MESSAGE_LIMIT for page in pages)
    seen = [p.id for page in pages for p in page.points]
    assert seen == [f"p{i:02}" for i in range(70)] and len(pages) == 2


async def test_reads_that_cannot_be_paged_are_refused_before_their_payloads_are_sent(heavy_points):
    stub, md = heavy_points
    near = vector_pb2.Vector(values=[1.0, 0.0])
    refused = {
        "limit": stub.Search(
            vector_pb2.SearchRequest(collection="heavy", vector=near, limit=100, with_payload=True),
            metadata=md,
        ),
        "ids": stub.GetPoints(
            vector_pb2.GetPointsRequest(
                collection="heavy", ids=[f"p{i:02}" for i in range(70)], with_payload=True
            ),
            metadata=md,
        ),
        "hybrid limit": stub.HybridSearch(
            vector_pb2.HybridSearchRequest(
                collection="heavy", vector=near, text="word", limit=100, with_payload=True
            ),
            metadata=md,
        ),
        "searches[0].limit": stub.SearchBatch(
            vector_pb2.SearchBatchRequest(
                searches=[
                    vector_pb2.SearchRequest(collection="heavy", vector=near, limit=100, with_payload=True)
                ]
            ),
            metadata=md,
        ),
    }
    for what, call in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, what
        info = error_info(caught.value)
        assert info.reason == "RESPONSE_TOO_LARGE", what
        assert info.metadata["field"] == what.removeprefix("hybrid "), what
    # What fits answers: fewer results, no payloads, or a threshold that leaves the far points out.
    few = await stub.Search(
        vector_pb2.SearchRequest(collection="heavy", vector=near, limit=20, with_payload=True), metadata=md
    )
    assert [h.id for h in few.hits] == [f"p{i:02}" for i in range(20)]
    bare = await stub.GetPoints(
        vector_pb2.GetPointsRequest(collection="heavy", ids=["p00", "p69"]), metadata=md
    )
    assert [p.id for p in bare.points] == ["p00", "p69"]
    near_only = await stub.Search(
        vector_pb2.SearchRequest(
            collection="heavy", vector=near, limit=100, with_payload=True, score_threshold=-30.5
        ),
        metadata=md,
    )
    assert len(near_only.hits) == 31 and near_only.ByteSize() <= MESSAGE_LIMIT

"""VectorService through the real gateway and processes.

Every test works in fresh tenants (keys from ``make_key``), so collection
names never collide between tests. Expected rankings come from exact
computations in pure Python on the same float32 data.
"""

from __future__ import annotations

import asyncio
import math
import random
import string
import struct
import time
import uuid
from collections.abc import Sequence

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from strata.admin.v1 import admin_pb2
from strata.common.v1 import filter_pb2
from strata.tenants.v1 import tenants_pb2
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from tests.support.calls import assert_invalid, bearer, rpc_error
from tests.support.documents import cond
from tests.support.errors import error_info
from tests.support.minilm import MiniLM

pytestmark = pytest.mark.e2e

COSINE = vector_pb2.METRIC_COSINE
L2 = vector_pb2.METRIC_L2
IP = vector_pb2.METRIC_INNER_PRODUCT
METRICS = {"cosine": COSINE, "l2": L2, "inner_product": IP}
DOMAIN = "strata.vector.v1"
READ, WRITE = "vector:read", "vector:write"
# pgvector computes in float32; Python recomputes in float64 from the same float32 inputs.
TOLERANCE = 1e-4
Metadata = tuple[tuple[str, str], ...]


# -- helpers ------------------------------------------------------------------


def f32(x: float) -> float:
    """``x`` rounded to float32, as it travels and is stored."""
    return struct.unpack("f", struct.pack("f", x))[0]


def vec(values: Sequence[float]) -> vector_pb2.Vector:
    return vector_pb2.Vector(values=list(values))


def payload(value: dict) -> struct_pb2.Struct:
    data = struct_pb2.Struct()
    data.update(value)
    return data


def point(
    point_id: str, values: Sequence[float], data: dict | None = None, text: str = ""
) -> vector_pb2.Point:
    made = vector_pb2.Point(id=point_id, vector=vec(values), text=text)
    if data is not None:
        made.payload.CopyFrom(payload(data))
    return made


def random_vectors(rng: random.Random, n: int, dim: int, scaled: bool = False) -> list[list[float]]:
    """``n`` Gaussian vectors of float32 values; ``scaled`` varies their norms (for inner product)."""
    out = []
    for _ in range(n):
        scale = rng.uniform(0.3, 3.0) if scaled else 1.0
        out.append([f32(rng.gauss(0, 1) * scale) for _ in range(dim)])
    return out


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def norm(a: Sequence[float]) -> float:
    return math.sqrt(dot(a, a))


def l2(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def expected_score(metric: int, query: Sequence[float], v: Sequence[float]) -> float:
    """The proto's score: cosine similarity, -L2 distance, dot product."""
    if metric == COSINE:
        return dot(query, v) / (norm(query) * norm(v))
    if metric == L2:
        return -l2(query, v)
    return dot(query, v)


def expected_distance(metric: int, score: float) -> float:
    """pgvector's distance for the metric, from the score."""
    return 1.0 - score if metric == COSINE else -score


def brute_force(
    metric: int, query: Sequence[float], vectors: dict[str, list[float]], k: int
) -> list[tuple[str, float]]:
    """The exact top ``k`` (id, score), best first."""
    scored = [(pid, expected_score(metric, query, v)) for pid, v in vectors.items()]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:k]


def assert_ranking(
    hits: Sequence[vector_pb2.ScoredPoint],
    metric: int,
    query: Sequence[float],
    vectors: dict[str, list[float]],
    k: int,
) -> None:
    """``hits`` are the exact top ``k``: at each rank, a point whose true score is the true k-th score.

    Comparing scores rather than ids keeps near-ties (within float32 error) from failing the check.
    """
    truth = brute_force(metric, query, vectors, k)
    assert len(hits) == len(truth), [h.id for h in hits]
    assert len({h.id for h in hits}) == len(hits), "an id appears twice"
    for rank, (hit, (_, best)) in enumerate(zip(hits, truth, strict=True)):
        actual = expected_score(metric, query, vectors[hit.id])
        assert abs(actual - best) <= TOLERANCE, (
            f"rank {rank}: got {hit.id} (score {actual:.6f}), expected score {best:.6f}; "
            f"got {[h.id for h in hits]}, expected {[pid for pid, _ in truth]}"
        )
        assert abs(hit.score - actual) <= TOLERANCE, (hit.id, hit.score, actual)
        assert abs(hit.distance - expected_distance(metric, actual)) <= TOLERANCE, (hit.id, hit.distance)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def assert_not_found(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    info = error_info(error)
    assert (info.reason, info.domain) == ("COLLECTION_NOT_FOUND", DOMAIN)


async def create(
    stub: vector_pb2_grpc.VectorServiceStub,
    metadata: Metadata,
    name: str,
    dimension: int,
    metric: int = COSINE,
    **index,
) -> vector_pb2.Collection:
    """Create a collection; ``index`` is one of hnsw=…, ivfflat=…, none=… (unset: HNSW defaults)."""
    spec = vector_pb2.Collection(name=name, dimension=dimension, metric=metric, **index)
    return (
        await stub.CreateCollection(vector_pb2.CreateCollectionRequest(collection=spec), metadata=metadata)
    ).collection


async def upsert(
    stub: vector_pb2_grpc.VectorServiceStub,
    metadata: Metadata,
    name: str,
    points: Sequence[vector_pb2.Point],
    batch: int = 1000,
) -> int:
    written = 0
    for start in range(0, len(points), batch):
        response = await stub.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection=name, points=points[start : start + batch]),
            metadata=metadata,
        )
        written += response.upserted
    return written


async def count(
    stub: vector_pb2_grpc.VectorServiceStub,
    metadata: Metadata,
    name: str,
    where: filter_pb2.Filter | None = None,
) -> int:
    request = vector_pb2.ScrollPointsRequest(
        collection=name, filter=where, page_size=1, include_total_size=True
    )
    return (await stub.ScrollPoints(request, metadata=metadata)).total_size


async def search(
    stub: vector_pb2_grpc.VectorServiceStub, metadata: Metadata, name: str, query: Sequence[float], **options
) -> list[vector_pb2.ScoredPoint]:
    request = vector_pb2.SearchRequest(collection=name, vector=vec(query), **options)
    return list((await stub.Search(request, metadata=metadata)).hits)


async def scroll_ids(
    stub: vector_pb2_grpc.VectorServiceStub,
    metadata: Metadata,
    name: str,
    page_size: int,
    where: filter_pb2.Filter | None = None,
) -> tuple[list[str], int]:
    """Every id the scroll returns, in order, and the number of pages."""
    ids: list[str] = []
    token, pages = "", 0
    while True:
        page = await stub.ScrollPoints(
            vector_pb2.ScrollPointsRequest(
                collection=name, filter=where, page_size=page_size, page_token=token
            ),
            metadata=metadata,
        )
        pages += 1
        assert len(page.points) <= page_size
        ids.extend(p.id for p in page.points)
        token = page.next_page_token
        if not token:
            return ids, pages


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def new_tenant(make_key):
    """A factory: metadata of a vector:read + vector:write key for a brand-new tenant."""

    async def make() -> Metadata:
        api_key, _ = await make_key(f"v-{uuid.uuid4().hex[:10]}", READ, WRITE)
        return bearer(api_key)

    return make


# -- collections --------------------------------------------------------------


async def test_create_defaults_to_hnsw_and_get_counts_points(gw_vector, md):
    made = await create(gw_vector, md, "docs", 3, COSINE)
    assert (made.name, made.dimension, made.metric) == ("docs", 3, COSINE)
    assert made.WhichOneof("index") == "hnsw"
    assert (made.hnsw.m, made.hnsw.ef_construction) == (16, 64)
    assert made.create_time.seconds > 0 and made.point_count == 0
    got = (
        await gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="docs"), metadata=md)
    ).collection
    assert got.point_count == 0 and got.WhichOneof("index") == "hnsw" and got.create_time == made.create_time
    await upsert(gw_vector, md, "docs", [point(f"p{i}", [1, i, 0]) for i in range(7)])
    got = (
        await gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="docs"), metadata=md)
    ).collection
    assert got.point_count == 7


async def test_create_with_explicit_hnsw_ivfflat_and_no_index(gw_vector, md):
    hnsw = await create(gw_vector, md, "h", 8, L2, hnsw=vector_pb2.HnswIndex(m=8, ef_construction=32))
    assert hnsw.WhichOneof("index") == "hnsw" and (hnsw.hnsw.m, hnsw.hnsw.ef_construction) == (8, 32)
    ivf = await create(gw_vector, md, "i", 8, IP, ivfflat=vector_pb2.IvfflatIndex(lists=7))
    assert ivf.WhichOneof("index") == "ivfflat" and ivf.ivfflat.lists == 7 and ivf.metric == IP
    ivf_default = await create(gw_vector, md, "i2", 8, L2, ivfflat=vector_pb2.IvfflatIndex())
    assert ivf_default.ivfflat.lists == 100
    flat = await create(gw_vector, md, "n", 8, COSINE, none=vector_pb2.NoIndex())
    assert flat.WhichOneof("index") == "none"
    for name, kind in (("h", "hnsw"), ("i", "ivfflat"), ("n", "none")):
        got = (
            await gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name=name), metadata=md)
        ).collection
        assert got.WhichOneof("index") == kind and got.dimension == 8


async def test_dimension_limits_allow_2000_with_an_index_and_16000_without(gw_vector, md):
    await create(gw_vector, md, "wide-hnsw", 2000)
    await create(gw_vector, md, "widest", 16000, L2, none=vector_pb2.NoIndex())
    rng = random.Random(7)
    vectors = {f"w{i}": [f32(rng.uniform(-1, 1)) for _ in range(16000)] for i in range(3)}
    await upsert(gw_vector, md, "widest", [point(pid, v) for pid, v in vectors.items()])
    query = vectors["w1"]
    hits = await search(gw_vector, md, "widest", query, limit=3)
    assert_ranking(hits, L2, query, vectors, 3)
    assert hits[0].id == "w1" and abs(hits[0].score) <= TOLERANCE


async def test_list_collections_pages_by_name(gw_vector, md):
    names = ["delta", "alpha", "Echo", "charlie", "bravo"]
    for name in names:
        await create(gw_vector, md, name, 2, none=vector_pb2.NoIndex())
    seen, pages, token = [], 0, ""
    while True:
        page = await gw_vector.ListCollections(
            vector_pb2.ListCollectionsRequest(page_size=2, page_token=token), metadata=md
        )
        pages += 1
        assert len(page.collections) <= 2
        seen.extend(c.name for c in page.collections)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(names) and pages == 3
    everything = await gw_vector.ListCollections(vector_pb2.ListCollectionsRequest(), metadata=md)
    assert [c.name for c in everything.collections] == sorted(names) and not everything.next_page_token


async def test_delete_collection_reports_points_deleted_and_then_it_is_gone(gw_vector, md):
    await create(gw_vector, md, "doomed", 2)
    await upsert(gw_vector, md, "doomed", [point(f"p{i}", [1, i]) for i in range(42)])
    gone = await gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name="doomed"), metadata=md)
    assert gone.points_deleted == 42
    assert_not_found(
        await rpc_error(gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="doomed"), metadata=md))
    )
    assert_not_found(
        await rpc_error(
            gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name="doomed"), metadata=md)
        )
    )
    again = await create(gw_vector, md, "doomed", 5)
    assert again.dimension == 5
    assert await count(gw_vector, md, "doomed") == 0


async def test_a_taken_name_is_already_exists(gw_vector, md):
    await create(gw_vector, md, "taken", 4)
    error = await rpc_error(create(gw_vector, md, "taken", 8, L2))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(error)
    assert (info.reason, info.domain) == ("COLLECTION_ALREADY_EXISTS", DOMAIN)
    got = (
        await gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="taken"), metadata=md)
    ).collection
    assert (got.dimension, got.metric) == (4, COSINE), "the first collection is untouched"


async def test_every_call_on_a_missing_collection_is_not_found(gw_vector, md):
    name = "nowhere"
    calls = [
        gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name=name), metadata=md),
        gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name=name), metadata=md),
        gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection=name, points=[point("a", [1.0])]), metadata=md
        ),
        gw_vector.GetPoints(vector_pb2.GetPointsRequest(collection=name, ids=["a"]), metadata=md),
        gw_vector.DeletePoints(
            vector_pb2.DeletePointsRequest(collection=name, ids=vector_pb2.PointIds(ids=["a"])), metadata=md
        ),
        gw_vector.ScrollPoints(vector_pb2.ScrollPointsRequest(collection=name), metadata=md),
        gw_vector.Search(vector_pb2.SearchRequest(collection=name, vector=vec([1.0])), metadata=md),
        gw_vector.SearchBatch(
            vector_pb2.SearchBatchRequest(
                searches=[vector_pb2.SearchRequest(collection=name, vector=vec([1.0]))]
            ),
            metadata=md,
        ),
        gw_vector.HybridSearch(
            vector_pb2.HybridSearchRequest(collection=name, vector=vec([1.0]), text="x"), metadata=md
        ),
    ]
    for call in calls:
        assert_not_found(await rpc_error(call))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "", "dimension": 4, "metric": COSINE}, "collection.name"),
        ({"name": "a b", "dimension": 4, "metric": COSINE}, "collection.name"),
        ({"name": "x" * 65, "dimension": 4, "metric": COSINE}, "collection.name"),
        ({"name": "é", "dimension": 4, "metric": COSINE}, "collection.name"),
        ({"name": "c'; DROP TABLE vector.points; --", "dimension": 4, "metric": COSINE}, "collection.name"),
        ({"name": "c", "dimension": 0, "metric": COSINE}, "collection.dimension"),
        ({"name": "c", "dimension": -3, "metric": COSINE, "none": {}}, "collection.dimension"),
        ({"name": "c", "dimension": 2001, "metric": COSINE}, "collection.dimension"),
        ({"name": "c", "dimension": 2001, "metric": COSINE, "hnsw": {}}, "collection.dimension"),
        ({"name": "c", "dimension": 2001, "metric": L2, "ivfflat": {}}, "collection.dimension"),
        ({"name": "c", "dimension": 16001, "metric": COSINE, "none": {}}, "collection.dimension"),
        ({"name": "c", "dimension": 4}, "collection.metric"),
        ({"name": "c", "dimension": 4, "metric": 99}, "collection.metric"),
        ({"name": "c", "dimension": 4, "metric": COSINE, "hnsw": {"m": 1}}, "collection.hnsw"),
        ({"name": "c", "dimension": 4, "metric": COSINE, "hnsw": {"m": 101}}, "collection.hnsw"),
        ({"name": "c", "dimension": 4, "metric": COSINE, "hnsw": {"ef_construction": 3}}, "collection.hnsw"),
        (
            {"name": "c", "dimension": 4, "metric": COSINE, "hnsw": {"ef_construction": 1001}},
            "collection.hnsw",
        ),
        (
            {"name": "c", "dimension": 4, "metric": COSINE, "hnsw": {"m": 16, "ef_construction": 20}},
            "collection.hnsw",
        ),
        (
            {"name": "c", "dimension": 4, "metric": COSINE, "ivfflat": {"lists": 32769}},
            "collection.ivfflat.lists",
        ),
        (
            {"name": "c", "dimension": 4, "metric": COSINE, "ivfflat": {"lists": -1}},
            "collection.ivfflat.lists",
        ),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else value,
)
async def test_bad_collection_specs_are_invalid_argument_naming_the_field(gw_vector, md, spec, field):
    collection = json_format.ParseDict(spec, vector_pb2.Collection())
    error = await rpc_error(
        gw_vector.CreateCollection(vector_pb2.CreateCollectionRequest(collection=collection), metadata=md)
    )
    assert_invalid(error, field)
    listed = await gw_vector.ListCollections(vector_pb2.ListCollectionsRequest(), metadata=md)
    assert not listed.collections, "nothing was created"


async def test_a_bad_collection_name_in_a_lookup_is_invalid_argument(gw_vector, md):
    error = await rpc_error(gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="a/b"), metadata=md))
    assert_invalid(error, "name")
    error = await rpc_error(
        gw_vector.ScrollPoints(vector_pb2.ScrollPointsRequest(collection=""), metadata=md)
    )
    assert_invalid(error, "collection")


async def test_reads_need_vector_read_and_writes_need_vector_write(gw_vector, make_key, slug):
    writer_key, _ = await make_key(slug, WRITE)
    reader_key, _ = await make_key(slug, READ)
    writer, reader = bearer(writer_key), bearer(reader_key)
    await create(gw_vector, writer, "scoped", 2)
    await upsert(gw_vector, writer, "scoped", [point("a", [1, 0])])
    denied = [
        create(gw_vector, reader, "other", 2),
        gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="scoped", points=[point("b", [0, 1])]), metadata=reader
        ),
        gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name="scoped"), metadata=reader),
        gw_vector.Search(vector_pb2.SearchRequest(collection="scoped", vector=vec([1, 0])), metadata=writer),
        gw_vector.ScrollPoints(vector_pb2.ScrollPointsRequest(collection="scoped"), metadata=writer),
    ]
    for call in denied:
        assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count(gw_vector, reader, "scoped") == 1


# -- points -------------------------------------------------------------------


async def test_upsert_takes_1000_points_in_one_call(gw_vector, md):
    await create(gw_vector, md, "bulk", 64)
    rng = random.Random(1)
    points = [point(f"p{i:04d}", v, {"i": i}) for i, v in enumerate(random_vectors(rng, 1000, 64))]
    response = await gw_vector.UpsertPoints(
        vector_pb2.UpsertPointsRequest(collection="bulk", points=points), metadata=md
    )
    assert response.upserted == 1000
    assert await count(gw_vector, md, "bulk") == 1000
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="bulk", ids=["p0999", "p0000"], with_vectors=True), metadata=md
    )
    assert [p.id for p in got.points] == ["p0999", "p0000"]
    assert list(got.points[0].vector.values) == list(points[999].vector.values)


async def test_upsert_replaces_points_with_existing_ids(gw_vector, md):
    await create(gw_vector, md, "replace", 3)
    await upsert(gw_vector, md, "replace", [point("a", [1, 0, 0], {"v": 1}, "old"), point("b", [0, 1, 0])])
    response = await gw_vector.UpsertPoints(
        vector_pb2.UpsertPointsRequest(
            collection="replace", points=[point("a", [0, 0, 1], {"v": 2}, "new"), point("c", [1, 1, 1])]
        ),
        metadata=md,
    )
    assert response.upserted == 2
    assert await count(gw_vector, md, "replace") == 3
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="replace", ids=["a"], with_vectors=True, with_payload=True),
        metadata=md,
    )
    (a,) = got.points
    assert list(a.vector.values) == [0, 0, 1]
    assert json_format.MessageToDict(a.payload) == {"v": 2} and a.text == "new"
    hits = await search(gw_vector, md, "replace", [0, 0, 1], limit=1, exact=True)
    assert hits[0].id == "a" and abs(hits[0].score - 1) <= TOLERANCE


async def test_get_points_with_and_without_vectors_and_payload(gw_vector, md):
    await create(gw_vector, md, "get", 6, L2)
    values = [0.1, 1 / 3, -2.5e-3, 12345.678, -1e-20, 3.4e38]
    data = {"title": "ünïcode ✓", "n": 1.5, "tags": ["a", "b"], "nested": {"ok": True, "none": None}}
    await upsert(
        gw_vector, md, "get", [point("full", values, data, "some text"), point("bare", [1, 2, 3, 4, 5, 6])]
    )

    async def get(**flags) -> vector_pb2.GetPointsResponse:
        return await gw_vector.GetPoints(
            vector_pb2.GetPointsRequest(collection="get", ids=["full", "bare"], **flags), metadata=md
        )

    everything = await get(with_vectors=True, with_payload=True)
    full, bare = everything.points
    assert list(full.vector.values) == [f32(v) for v in values], "float32 values round-trip exactly"
    assert json_format.MessageToDict(full.payload) == data and full.text == "some text"
    assert list(bare.vector.values) == [1, 2, 3, 4, 5, 6]
    assert json_format.MessageToDict(bare.payload) == {} and bare.text == ""
    only_ids = (await get()).points
    assert [p.id for p in only_ids] == ["full", "bare"]
    for p in only_ids:
        assert not p.HasField("vector") and not p.HasField("payload") and p.text == ""
    vectors_only = (await get(with_vectors=True)).points[0]
    assert vectors_only.HasField("vector") and not vectors_only.HasField("payload") and not vectors_only.text
    payload_only = (await get(with_payload=True)).points[0]
    assert not payload_only.HasField("vector") and payload_only.text == "some text"
    assert json_format.MessageToDict(payload_only.payload) == data


async def test_get_points_keeps_request_order_and_lists_missing_ids(gw_vector, md):
    await create(gw_vector, md, "order", 2)
    await upsert(gw_vector, md, "order", [point(f"p{i}", [1, i]) for i in range(5)])
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="order", ids=["p3", "nope", "p0", "p3", "gone"]), metadata=md
    )
    assert [p.id for p in got.points] == ["p3", "p0"]
    assert list(got.missing_ids) == ["nope", "gone"]
    error = await rpc_error(gw_vector.GetPoints(vector_pb2.GetPointsRequest(collection="order"), metadata=md))
    assert_invalid(error, "ids")


async def test_delete_points_by_ids(gw_vector, md):
    await create(gw_vector, md, "del", 2)
    await upsert(gw_vector, md, "del", [point(f"p{i}", [1, i]) for i in range(10)])
    gone = await gw_vector.DeletePoints(
        vector_pb2.DeletePointsRequest(
            collection="del", ids=vector_pb2.PointIds(ids=["p1", "p2", "missing"])
        ),
        metadata=md,
    )
    assert gone.deleted == 2
    assert await count(gw_vector, md, "del") == 8
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="del", ids=["p1", "p3"]), metadata=md
    )
    assert [p.id for p in got.points] == ["p3"] and list(got.missing_ids) == ["p1"]
    error = await rpc_error(
        gw_vector.DeletePoints(vector_pb2.DeletePointsRequest(collection="del"), metadata=md)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await count(gw_vector, md, "del") == 8


async def test_delete_points_by_filter(gw_vector, md):
    await create(gw_vector, md, "delf", 2)
    await upsert(
        gw_vector,
        md,
        "delf",
        [point(f"p{i:02d}", [1, i], {"kind": "odd" if i % 2 else "even", "n": i}) for i in range(20)],
    )
    gone = await gw_vector.DeletePoints(
        vector_pb2.DeletePointsRequest(collection="delf", filter=cond("kind", "OPERATOR_EQ", "odd")),
        metadata=md,
    )
    assert gone.deleted == 10
    ids, _ = await scroll_ids(gw_vector, md, "delf", 100)
    assert ids == [f"p{i:02d}" for i in range(0, 20, 2)]
    gone = await gw_vector.DeletePoints(
        vector_pb2.DeletePointsRequest(collection="delf", filter=cond("n", "OPERATOR_GTE", 100)), metadata=md
    )
    assert gone.deleted == 0 and await count(gw_vector, md, "delf") == 10


async def test_count_points_with_and_without_a_filter(gw_vector, md):
    await create(gw_vector, md, "cnt", 2)
    await upsert(
        gw_vector,
        md,
        "cnt",
        [point(f"p{i}", [1, i], {"tag": "a" if i < 7 else "b", "n": i}) for i in range(25)],
    )
    assert await count(gw_vector, md, "cnt") == 25
    assert await count(gw_vector, md, "cnt", cond("tag", "OPERATOR_EQ", "a")) == 7
    assert await count(gw_vector, md, "cnt", cond("n", "OPERATOR_GTE", 20)) == 5
    both = filter_pb2.Filter(
        all_of=filter_pb2.FilterList(filters=[cond("tag", "OPERATOR_EQ", "b"), cond("n", "OPERATOR_LT", 10)])
    )
    assert await count(gw_vector, md, "cnt", both) == 3
    assert await count(gw_vector, md, "cnt", cond("missing", "OPERATOR_EXISTS", True)) == 0


async def test_scroll_pages_through_every_id_once_in_id_order(gw_vector, md):
    await create(gw_vector, md, "scroll", 2)
    rng = random.Random(3)
    alphabet = string.ascii_letters + string.digits + "_.:-"
    ids: set[str] = set()
    while len(ids) < 237:
        ids.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
    shuffled = sorted(ids)
    rng.shuffle(shuffled)
    even = {pid for i, pid in enumerate(shuffled) if i % 2 == 0}
    await upsert(
        gw_vector, md, "scroll", [point(pid, [1, i], {"even": pid in even}) for i, pid in enumerate(shuffled)]
    )
    seen, pages = await scroll_ids(gw_vector, md, "scroll", 17)
    assert seen == sorted(ids) and pages == math.ceil(237 / 17)
    filtered, _ = await scroll_ids(gw_vector, md, "scroll", 10, cond("even", "OPERATOR_EQ", True))
    assert filtered == sorted(even)
    default = await gw_vector.ScrollPoints(
        vector_pb2.ScrollPointsRequest(collection="scroll", with_vectors=True, with_payload=True), metadata=md
    )
    assert len(default.points) == 100 and default.next_page_token
    assert all(len(p.vector.values) == 2 and "even" in p.payload for p in default.points)


async def test_a_scroll_token_only_fits_its_own_tenant_collection_and_filter(gw_vector, md, new_tenant):
    other = await new_tenant()
    for metadata in (md, other):
        for name in ("s1", "s2"):
            await create(gw_vector, metadata, name, 2)
            await upsert(gw_vector, metadata, name, [point(f"p{i}", [1, i], {"n": i}) for i in range(10)])
    where = cond("n", "OPERATOR_GTE", 2)
    first = await gw_vector.ScrollPoints(
        vector_pb2.ScrollPointsRequest(collection="s1", filter=where, page_size=3), metadata=md
    )
    token = first.next_page_token
    assert token
    second = await gw_vector.ScrollPoints(
        vector_pb2.ScrollPointsRequest(collection="s1", filter=where, page_size=3, page_token=token),
        metadata=md,
    )
    assert [p.id for p in second.points] == ["p5", "p6", "p7"]
    misuses = [
        (other, vector_pb2.ScrollPointsRequest(collection="s1", filter=where, page_size=3, page_token=token)),
        (md, vector_pb2.ScrollPointsRequest(collection="s1", page_size=3, page_token=token)),
        (
            md,
            vector_pb2.ScrollPointsRequest(
                collection="s1", filter=cond("n", "OPERATOR_GTE", 3), page_size=3, page_token=token
            ),
        ),
        (md, vector_pb2.ScrollPointsRequest(collection="s2", filter=where, page_size=3, page_token=token)),
        (md, vector_pb2.ScrollPointsRequest(collection="s1", filter=where, page_token=token[:-4] + "AAAA")),
    ]
    for metadata, request in misuses:
        assert_invalid(await rpc_error(gw_vector.ScrollPoints(request, metadata=metadata)), "page_token")
    listed = await gw_vector.ListCollections(vector_pb2.ListCollectionsRequest(page_size=1), metadata=md)
    assert listed.next_page_token
    error = await rpc_error(
        gw_vector.ListCollections(
            vector_pb2.ListCollectionsRequest(page_size=1, page_token=listed.next_page_token), metadata=other
        )
    )
    assert_invalid(error, "page_token")


# -- bad input writes nothing -------------------------------------------------


def _bad_batches() -> list:
    ok = point("new-ok", [0.5, 0.5, 0.5, 0.5])
    replaced = point("p0", [9, 9, 9, 9], {"replaced": True})
    return [
        pytest.param([replaced, point("x", [1, 2, 3])], "points[1].vector", id="wrong-length"),
        pytest.param([replaced, point("x", [1, 2, 3, 4, 5])], "points[1].vector", id="too-long"),
        pytest.param([replaced, point("x", [1, math.nan, 0, 0])], "points[1].vector", id="nan"),
        pytest.param([replaced, point("x", [math.inf, 0, 0, 0])], "points[1].vector", id="plus-inf"),
        pytest.param([replaced, point("x", [0, 0, 0, -math.inf])], "points[1].vector", id="minus-inf"),
        pytest.param([replaced, point("x", [])], "points[1].vector", id="empty-vector"),
        pytest.param([replaced, vector_pb2.Point(id="x")], "points[1].vector", id="no-vector"),
        pytest.param([ok, point("new-ok", [1, 1, 1, 1])], "points[1].id", id="duplicate-id"),
        pytest.param([replaced, point("a b", [1, 1, 1, 1])], "points[1].id", id="bad-id"),
        pytest.param([replaced, point("", [1, 1, 1, 1])], "points[1].id", id="empty-id"),
        pytest.param([replaced, point("x" * 129, [1, 1, 1, 1])], "points[1].id", id="long-id"),
        pytest.param(
            [replaced] + [point(f"n{i}", [1, 1, 1, i]) for i in range(1000)], "points", id="1001-points"
        ),
        pytest.param([], "points", id="no-points"),
        pytest.param(
            [replaced, point("x", [1, 1, 1, 1], {"k": "a\x00b"})], "points[1].payload", id="nul-value"
        ),
        pytest.param([replaced, point("x", [1, 1, 1, 1], {"a\x00": 1})], "points[1].payload", id="nul-key"),
        pytest.param(
            [replaced, point("x", [1, 1, 1, 1], {"blob": "x" * (64 * 1024)})],
            "points[1].payload",
            id="oversized-payload",
        ),
        pytest.param([replaced, point("x", [1, 1, 1, 1], text="a\x00b")], "points[1].text", id="nul-text"),
        pytest.param(
            [replaced, point("x", [1, 1, 1, 1], text="y" * (64 * 1024 + 1))],
            "points[1].text",
            id="oversized-text",
        ),
    ]


@pytest.mark.parametrize(("points", "field"), _bad_batches())
async def test_a_bad_batch_is_invalid_argument_and_writes_nothing(gw_vector, md, points, field):
    await create(gw_vector, md, "strict", 4)
    await upsert(gw_vector, md, "strict", [point(f"p{i}", [1, 0, 0, i]) for i in range(5)])
    error = await rpc_error(
        gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="strict", points=points), metadata=md
        )
    )
    assert_invalid(error, field)
    assert await count(gw_vector, md, "strict") == 5
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="strict", ids=["p0"], with_vectors=True, with_payload=True),
        metadata=md,
    )
    (p0,) = got.points
    assert list(p0.vector.values) == [1, 0, 0, 0] and json_format.MessageToDict(p0.payload) == {}, (
        "the valid point in the batch was not written either"
    )


async def test_a_payload_at_the_limit_is_accepted(gw_vector, md):
    await create(gw_vector, md, "limit", 2)
    blob = "x" * (64 * 1024 - len('{"b":""}'))
    assert await upsert(gw_vector, md, "limit", [point("big", [1, 0], {"b": blob}, text="t" * 65536)]) == 1
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="limit", ids=["big"], with_payload=True), metadata=md
    )
    assert got.points[0].payload["b"] == blob and len(got.points[0].text) == 65536


async def test_a_payload_with_the_text_backslash_u0000_but_no_nul_is_accepted(gw_vector, md):
    # Six characters \ u 0 0 0 0 (a Windows path, an escaped JSON sample): no NUL anywhere.
    data = {"path": "C:\\u0000dir", "sample": '{"s": "\\u0000"}'}
    assert not any("\x00" in v for v in data.values())
    await create(gw_vector, md, "escaped", 2)
    await upsert(gw_vector, md, "escaped", [point("p", [1, 0], data)])
    got = await gw_vector.GetPoints(
        vector_pb2.GetPointsRequest(collection="escaped", ids=["p"], with_payload=True), metadata=md
    )
    assert json_format.MessageToDict(got.points[0].payload) == data


# -- search -------------------------------------------------------------------


@pytest.mark.parametrize("index", ["hnsw", "none"])
@pytest.mark.parametrize("metric_name", list(METRICS))
async def test_search_orders_hits_closest_first_with_the_metrics_score(gw_vector, md, metric_name, index):
    metric = METRICS[metric_name]
    await create(gw_vector, md, "m", 8, metric, **{index: {}})
    rng = random.Random(f"{metric_name}-{index}")
    vectors = {f"p{i:03d}": v for i, v in enumerate(random_vectors(rng, 300, 8, scaled=True))}
    await upsert(gw_vector, md, "m", [point(pid, v) for pid, v in vectors.items()])
    for query in random_vectors(rng, 5, 8, scaled=True):
        hits = await search(gw_vector, md, "m", query, limit=10)
        assert_ranking(hits, metric, query, vectors, 10)
    # The score is the metric's own: the point itself is its own nearest neighbour (cosine 1, L2 0).
    own = vectors["p007"]
    best = (await search(gw_vector, md, "m", own, limit=1))[0]
    if metric == COSINE:
        assert best.id == "p007" and abs(best.score - 1) <= TOLERANCE and abs(best.distance) <= TOLERANCE
    elif metric == L2:
        assert best.id == "p007" and abs(best.score) <= TOLERANCE and abs(best.distance) <= TOLERANCE
    else:
        assert abs(best.score - max(dot(own, v) for v in vectors.values())) <= TOLERANCE * 10
        assert abs(best.score + best.distance) <= TOLERANCE


async def test_metrics_rank_the_same_data_differently(gw_vector, md):
    # Along x: "long" is far (L2) but has the biggest dot product; "unit" is the same direction.
    data = {"unit": [1.0, 0.0], "long": [10.0, 1.0], "near": [0.9, 0.5]}
    for name, metric in METRICS.items():
        await create(gw_vector, md, name, 2, metric, none=vector_pb2.NoIndex())
        await upsert(gw_vector, md, name, [point(pid, v) for pid, v in data.items()])
    first = {name: (await search(gw_vector, md, name, [1.0, 0.0], limit=3)) for name in METRICS}
    assert [h.id for h in first["cosine"]] == ["unit", "long", "near"]
    assert [h.id for h in first["l2"]] == ["unit", "near", "long"]
    assert [h.id for h in first["inner_product"]] == ["long", "unit", "near"]
    assert [round(h.score, 5) for h in first["inner_product"]] == [10.0, 1.0, 0.9]
    assert [round(h.score, 5) for h in first["l2"]] == [
        0.0,
        round(-math.hypot(0.1, 0.5), 5),
        round(-math.hypot(9, 1), 5),
    ]


@pytest.mark.parametrize("metric_name", ["cosine", "l2"])
async def test_score_threshold_keeps_only_hits_at_or_above_it(gw_vector, md, metric_name):
    metric = METRICS[metric_name]
    await create(gw_vector, md, "thr", 8, metric, none=vector_pb2.NoIndex())
    rng = random.Random(11)
    vectors = {f"p{i}": v for i, v in enumerate(random_vectors(rng, 100, 8))}
    await upsert(gw_vector, md, "thr", [point(pid, v) for pid, v in vectors.items()])
    query = random_vectors(rng, 1, 8)[0]
    truth = brute_force(metric, query, vectors, 10)
    # Between the 3rd and the 4th score.
    threshold = (truth[2][1] + truth[3][1]) / 2
    hits = await search(gw_vector, md, "thr", query, limit=10, score_threshold=threshold)
    assert [h.id for h in hits] == [pid for pid, _ in truth[:3]]
    assert all(h.score >= threshold for h in hits)
    assert await search(gw_vector, md, "thr", query, limit=10, score_threshold=truth[0][1] + 1) == []
    everything = await search(gw_vector, md, "thr", query, limit=10, score_threshold=-1e9)
    assert len(everything) == 10
    error = await rpc_error(search(gw_vector, md, "thr", query, score_threshold=math.nan))
    assert_invalid(error, "score_threshold")


async def test_search_returns_vectors_and_payloads_only_when_asked(gw_vector, md):
    await create(gw_vector, md, "with", 3, L2, none=vector_pb2.NoIndex())
    await upsert(
        gw_vector,
        md,
        "with",
        [point("a", [0.1, 0.2, 0.3], {"lang": "en", "n": 1}, "hello"), point("b", [5, 5, 5], {"n": 2})],
    )
    bare = await search(gw_vector, md, "with", [0, 0, 0], limit=2)
    assert [h.id for h in bare] == ["a", "b"]
    for hit in bare:
        assert not hit.HasField("vector") and not hit.HasField("payload") and hit.text == ""
    full = await search(gw_vector, md, "with", [0, 0, 0], limit=2, with_vectors=True, with_payload=True)
    assert list(full[0].vector.values) == [f32(0.1), f32(0.2), f32(0.3)]
    assert json_format.MessageToDict(full[0].payload) == {"lang": "en", "n": 1} and full[0].text == "hello"
    assert list(full[1].vector.values) == [5, 5, 5] and json_format.MessageToDict(full[1].payload) == {"n": 2}
    vectors_only = await search(gw_vector, md, "with", [0, 0, 0], limit=1, with_vectors=True)
    assert vectors_only[0].HasField("vector") and not vectors_only[0].HasField("payload")


async def test_exact_search_equals_a_brute_force_ranking_even_with_a_poor_index(gw_vector, md):
    # A deliberately weak graph (m=2, ef_construction=4): approximate answers may differ, exact ones may not.
    await create(gw_vector, md, "exact", 32, L2, hnsw=vector_pb2.HnswIndex(m=2, ef_construction=4))
    rng = random.Random(5)
    vectors = {f"p{i:04d}": v for i, v in enumerate(random_vectors(rng, 2000, 32))}
    groups = {pid: i % 3 for i, pid in enumerate(vectors)}
    await upsert(gw_vector, md, "exact", [point(pid, v, {"g": groups[pid]}) for pid, v in vectors.items()])
    for query in random_vectors(rng, 5, 32):
        hits = await search(gw_vector, md, "exact", query, limit=20, exact=True)
        assert_ranking(hits, L2, query, vectors, 20)
        filtered = await search(
            gw_vector, md, "exact", query, limit=15, exact=True, filter=cond("g", "OPERATOR_EQ", 1)
        )
        assert_ranking(filtered, L2, query, {p: v for p, v in vectors.items() if groups[p] == 1}, 15)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(cond("kind", "OPERATOR_EQ", "rare"), id="eq-rare"),
        # Approximate searches walk the ANN index and stop at LIMIT: only an iterative
        # scan finds 10 of the 1% behind the first ef_search candidates.
        pytest.param(cond("kind", "OPERATOR_NE", "common"), id="ne-common"),
    ],
)
@pytest.mark.parametrize("index", ["hnsw", "ivfflat"])
async def test_filtered_search_finds_k_matches_when_matches_are_rare(gw_vector, md, index, where):
    await create(gw_vector, md, "rare", 16, COSINE, **{index: {}})
    rng = random.Random(9)
    vectors = {f"p{i:04d}": v for i, v in enumerate(random_vectors(rng, 5000, 16))}
    rare = {pid for i, pid in enumerate(vectors) if i % 100 == 0}  # 1%: 50 points
    await upsert(
        gw_vector,
        md,
        "rare",
        [point(pid, v, {"kind": "rare" if pid in rare else "common"}) for pid, v in vectors.items()],
    )
    assert await count(gw_vector, md, "rare", where) == 50
    for query in random_vectors(rng, 3, 16):
        hits = await search(gw_vector, md, "rare", query, limit=10, filter=where)
        assert len(hits) == 10, f"{index}: {len(hits)} of 10 hits for a 1% filter"
        assert {h.id for h in hits} <= rare
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    everything = await search(gw_vector, md, "rare", random_vectors(rng, 1, 16)[0], limit=50, filter=where)
    assert {h.id for h in everything} == rare, f"{index}: {len(everything)} of the 50 matching points"


async def test_search_batch_returns_one_result_per_search_in_order(gw_vector, md):
    await create(gw_vector, md, "ba", 4, L2, none=vector_pb2.NoIndex())
    await create(gw_vector, md, "bb", 4, COSINE)
    rng = random.Random(13)
    for name in ("ba", "bb"):
        await upsert(
            gw_vector,
            md,
            name,
            [point(f"{name}{i}", v, {"i": i}) for i, v in enumerate(random_vectors(rng, 60, 4))],
        )
    q1, q2, q3 = random_vectors(rng, 3, 4)
    searches = [
        vector_pb2.SearchRequest(collection="ba", vector=vec(q1), limit=3),
        vector_pb2.SearchRequest(collection="bb", vector=vec(q2), limit=5, with_payload=True),
        vector_pb2.SearchRequest(
            collection="ba", vector=vec(q3), limit=2, filter=cond("i", "OPERATOR_LT", 10)
        ),
        vector_pb2.SearchRequest(collection="bb", vector=vec(q1)),
    ]
    batch = await gw_vector.SearchBatch(vector_pb2.SearchBatchRequest(searches=searches), metadata=md)
    assert [len(r.hits) for r in batch.results] == [3, 5, 2, 10]
    for request, result in zip(searches, batch.results, strict=True):
        alone = await gw_vector.Search(request, metadata=md)
        assert [h.id for h in result.hits] == [h.id for h in alone.hits]
        assert [h.score for h in result.hits] == pytest.approx([h.score for h in alone.hits])
    assert all(h.id.startswith("bb") and "i" in h.payload for h in batch.results[1].hits)
    filtered = await search(
        gw_vector, md, "ba", q3, limit=2, filter=cond("i", "OPERATOR_LT", 10), with_payload=True
    )
    assert [h.id for h in filtered] == [h.id for h in batch.results[2].hits]
    assert all(h.payload["i"] < 10 for h in filtered)
    error = await rpc_error(
        gw_vector.SearchBatch(vector_pb2.SearchBatchRequest(searches=[searches[0]] * 101), metadata=md)
    )
    assert_invalid(error, "searches")
    error = await rpc_error(gw_vector.SearchBatch(vector_pb2.SearchBatchRequest(), metadata=md))
    assert_invalid(error, "searches")


async def test_a_query_of_the_wrong_dimension_is_invalid_argument(gw_vector, md):
    await create(gw_vector, md, "dim", 4)
    await upsert(gw_vector, md, "dim", [point("a", [1, 2, 3, 4])])
    assert_invalid(await rpc_error(search(gw_vector, md, "dim", [1, 2, 3])), "vector")
    assert_invalid(await rpc_error(search(gw_vector, md, "dim", [1, 2, 3, 4, 5])), "vector")
    assert_invalid(await rpc_error(search(gw_vector, md, "dim", [])), "vector")
    assert_invalid(await rpc_error(search(gw_vector, md, "dim", [1, math.nan, 3, 4])), "vector")
    batch = vector_pb2.SearchBatchRequest(
        searches=[
            vector_pb2.SearchRequest(collection="dim", vector=vec([1, 2, 3, 4])),
            vector_pb2.SearchRequest(collection="dim", vector=vec([1, 2])),
        ]
    )
    assert_invalid(await rpc_error(gw_vector.SearchBatch(batch, metadata=md)), "searches[1].vector")
    hybrid = vector_pb2.HybridSearchRequest(collection="dim", vector=vec([1.0]), text="x")
    assert_invalid(await rpc_error(gw_vector.HybridSearch(hybrid, metadata=md)), "vector")
    assert_invalid(await rpc_error(search(gw_vector, md, "dim", [1, 2, 3, 4], limit=1001)), "limit")


# -- recall -------------------------------------------------------------------

RECALL_POINTS, RECALL_DIM, RECALL_CLUSTERS, RECALL_QUERIES, RECALL_K = 20_000, 128, 50, 50, 10
RECALL_SPREAD = 0.5  # standard deviation around each centre (centres ~ N(0, 1) per dimension)


def clustered_data(seed: int) -> tuple[dict[str, list[float]], list[list[float]]]:
    """Points and queries drawn around 50 Gaussian cluster centres (a fixed seed)."""
    rng = random.Random(seed)
    gauss = rng.gauss
    centres = [[gauss(0.0, 1.0) for _ in range(RECALL_DIM)] for _ in range(RECALL_CLUSTERS)]

    def sample() -> list[float]:
        centre = centres[rng.randrange(RECALL_CLUSTERS)]
        return [c + gauss(0.0, RECALL_SPREAD) for c in centre]

    points = {f"p{i:05d}": sample() for i in range(RECALL_POINTS)}
    queries = [sample() for _ in range(RECALL_QUERIES)]
    return points, queries


async def test_hnsw_recall_at_10_on_clustered_data_is_at_least_095(gw_vector, md):
    started = time.perf_counter()
    points, queries = clustered_data(seed=2024)
    generated = time.perf_counter()
    await create(gw_vector, md, "recall", RECALL_DIM, COSINE)
    ids = list(points)
    batches = [ids[i : i + 1000] for i in range(0, len(ids), 1000)]
    lanes = asyncio.Semaphore(2)

    async def load(batch: list[str]) -> int:
        async with lanes:
            response = await gw_vector.UpsertPoints(
                vector_pb2.UpsertPointsRequest(
                    collection="recall", points=[point(pid, points[pid]) for pid in batch]
                ),
                metadata=md,
                timeout=60,
            )
            return response.upserted

    assert sum(await asyncio.gather(*(load(b) for b in batches))) == RECALL_POINTS
    loaded = time.perf_counter()
    lanes = asyncio.Semaphore(4)

    async def ask(query: list[float], **options) -> list[str]:
        async with lanes:
            hits = await search(gw_vector, md, "recall", query, limit=RECALL_K, **options)
            return [h.id for h in hits]

    approximate = await asyncio.gather(*(ask(q) for q in queries))
    searched = time.perf_counter()
    # Before any exact search: those can switch the statement to a plan without the index (see below).
    narrow = await asyncio.gather(*(ask(q, ef_search=1) for q in queries))
    narrowed = time.perf_counter()
    exact = await asyncio.gather(*(ask(q, exact=True) for q in queries))
    scanned = time.perf_counter()

    def recall_of(found: list[list[str]]) -> list[float]:
        return [len(set(a) & set(e)) / RECALL_K for a, e in zip(found, exact, strict=True)]

    recalls, narrow_recalls = recall_of(approximate), recall_of(narrow)
    recall, narrow_recall = sum(recalls) / len(recalls), sum(narrow_recalls) / len(narrow_recalls)
    report = (
        f"recall@{RECALL_K} = {recall:.4f} (worst query {min(recalls):.1f}; ef_search=1: {narrow_recall:.4f}) "
        f"over {RECALL_QUERIES} queries, {RECALL_POINTS} x {RECALL_DIM} cosine, HNSW defaults; "
        f"generate {generated - started:.1f}s, upsert {loaded - generated:.1f}s, "
        f"{RECALL_QUERIES} searches {searched - loaded:.2f}s, "
        f"{RECALL_QUERIES} exact {scanned - narrowed:.2f}s, total {time.perf_counter() - started:.1f}s"
    )
    print(f"\n{report}")
    assert all(len(e) == RECALL_K for e in exact)
    # A sequential scan would be exact whatever ef_search is: this shows the searches went through HNSW.
    assert narrow_recall < 1.0, f"the HNSW index was not used: {report}"
    assert recall >= 0.95, report


async def test_search_sees_a_collection_made_again_under_its_name(gw_vector, md, slug, settings):
    # The service remembers a searched collection; another process (here: SQL as
    # the owner) drops it, and it is made again. Searches must see the new one.
    async def drop_behind_the_service() -> None:
        owner = await asyncpg.connect(settings.migrate_database_url)
        try:
            await owner.execute("SELECT set_config('strata.tenant_id', $1, false)", slug)
            gone = await owner.fetchval(
                "SELECT id FROM vector.collections WHERE tenant = $1 AND name = 'again'", slug
            )
            await owner.execute("SELECT vector.drop_index($1)", gone)
            await owner.execute("DELETE FROM vector.points WHERE collection_id = $1", gone)
            await owner.execute("DELETE FROM vector.collections WHERE id = $1", gone)
        finally:
            await owner.close()

    await create(gw_vector, md, "again", 2)
    await upsert(gw_vector, md, "again", [point("old", [1, 0])])
    assert [h.id for h in await search(gw_vector, md, "again", [1, 0])] == ["old"]
    await drop_behind_the_service()
    await create(gw_vector, md, "again", 2, L2, none=vector_pb2.NoIndex())
    await upsert(gw_vector, md, "again", [point("new", [0, 1]), point("newer", [3, 3])])
    hits = await search(gw_vector, md, "again", [1, 0])
    assert [h.id for h in hits] == ["new", "newer"]
    assert hits[0].distance == pytest.approx(math.sqrt(2), rel=TOLERANCE)  # L2 now, not cosine
    await drop_behind_the_service()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await search(gw_vector, md, "again", [1, 0])
    assert_not_found(missing.value)
    # Made again with another dimension: a query of the new dimension is answered, not refused.
    await create(gw_vector, md, "again", 3)
    await upsert(gw_vector, md, "again", [point("three", [0, 0, 1])])
    assert [h.id for h in await search(gw_vector, md, "again", [0, 0, 1])] == ["three"]


async def test_exact_searches_do_not_turn_later_searches_into_full_scans(gw_vector, md):
    # Other collections share vector.points: they make a generic plan look cheap.
    rng = random.Random(21)
    for c in range(30):
        await create(gw_vector, md, f"other{c}", 16)
        await upsert(
            gw_vector, md, f"other{c}", [point(f"p{i}", v) for i, v in enumerate(random_vectors(rng, 30, 16))]
        )
    await create(gw_vector, md, "big", 16)
    vectors = {f"p{i:04d}": v for i, v in enumerate(random_vectors(rng, 5000, 16))}
    await upsert(gw_vector, md, "big", [point(pid, v) for pid, v in vectors.items()])
    queries = random_vectors(rng, 20, 16)
    truth = [{pid for pid, _ in brute_force(COSINE, q, vectors, 10)} for q in queries]

    async def narrow_recall() -> float:
        # Sequential calls: the service's pool hands out the same connection again.
        found = [await search(gw_vector, md, "big", q, limit=10, ef_search=1) for q in queries]
        return sum(len({h.id for h in f} & t) for f, t in zip(found, truth, strict=True)) / (
            10 * len(queries)
        )

    before = await narrow_recall()
    assert before < 1.0, "ef_search=1 through HNSW is approximate"
    for q in queries * 2:
        await search(gw_vector, md, "big", q, limit=10, exact=True)
    after = await narrow_recall()
    assert after < 1.0, (
        f"after exact searches, ef_search=1 gives exact answers (recall {after:.3f}, before {before:.3f}): "
        "the searches no longer use the HNSW index"
    )


# -- hybrid -------------------------------------------------------------------


async def _hybrid_data(gw_vector, md) -> dict[str, list[float]]:
    await create(gw_vector, md, "hy", 3, COSINE)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "amber", "violet"]
    rng = random.Random(17)
    vectors: dict[str, list[float]] = {}
    points = []
    for i in range(30):
        v = [f32(rng.uniform(-1, 1)) for _ in range(3)]
        if i == 0:
            v = [1.0, 0.02, 0.0]  # the closest to the query [1, 0, 0]
        vectors[f"p{i:02d}"] = v
        text = " ".join(rng.choice(words) for _ in range(4))
        points.append(point(f"p{i:02d}", v, {"lang": "en"}, text))
    # The only text match for "quokka"; its vector is on the query's side but far from the closest.
    vectors["quokka"] = [1.0, 0.8, 0.6]
    points.append(point("quokka", vectors["quokka"], {"lang": "de"}, "a happy quokka smiles"))
    await upsert(gw_vector, md, "hy", points)
    return vectors


async def test_hybrid_search_ranks_the_only_text_match_first_though_not_the_closest(gw_vector, md):
    vectors = await _hybrid_data(gw_vector, md)
    query = [1.0, 0.0, 0.0]
    by_vector = [h.id for h in await search(gw_vector, md, "hy", query, limit=31, exact=True)]
    assert by_vector[0] == "p00" and 3 <= by_vector.index("quokka") < 20, by_vector
    response = await gw_vector.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection="hy", vector=vec(query), text="quokka", limit=5, with_payload=True
        ),
        metadata=md,
    )
    hits = list(response.hits)
    assert len(hits) == 5 and hits[0].id == "quokka"
    assert hits[0].text == "a happy quokka smiles" and hits[0].payload["lang"] == "de"
    assert hits[0].distance == pytest.approx(
        1 - expected_score(COSINE, query, vectors["quokka"]), abs=TOLERANCE
    )
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[1].id == "p00", "then the vector ranking"


async def test_hybrid_search_reports_distance_zero_for_a_text_only_match(gw_vector, md):
    await _hybrid_data(gw_vector, md)
    # Two candidates per side; the query points away from quokka, which comes from the text side only.
    response = await gw_vector.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection="hy", vector=vec([0.0, -1.0, 0.0]), text="quokka", limit=2, candidates=2
        ),
        metadata=md,
    )
    by_id = {h.id: h for h in response.hits}
    assert len(by_id) == 2 and "quokka" in by_id
    assert by_id["quokka"].distance == 0
    (other,) = (h for h in response.hits if h.id != "quokka")
    assert other.distance > 0 and by_id["quokka"].score == pytest.approx(other.score) == pytest.approx(1 / 61)


async def test_hybrid_search_applies_the_filter(gw_vector, md):
    await _hybrid_data(gw_vector, md)
    response = await gw_vector.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection="hy",
            vector=vec([1.0, 0.0, 0.0]),
            text="quokka",
            limit=5,
            filter=cond("lang", "OPERATOR_EQ", "en"),
            with_payload=True,
        ),
        metadata=md,
    )
    hits = list(response.hits)
    assert len(hits) == 5 and "quokka" not in [h.id for h in hits]
    assert all(h.payload["lang"] == "en" for h in hits)
    assert hits[0].id == "p00"
    error = await rpc_error(
        gw_vector.HybridSearch(
            vector_pb2.HybridSearchRequest(collection="hy", vector=vec([1.0, 0.0, 0.0]), text="  "),
            metadata=md,
        )
    )
    assert_invalid(error, "text")


# -- isolation ----------------------------------------------------------------


async def test_another_tenant_cannot_see_search_count_or_delete_a_collection(gw_vector, md, new_tenant):
    other = await new_tenant()
    await create(gw_vector, md, "private", 2)
    await upsert(gw_vector, md, "private", [point(f"p{i}", [1, i], {"secret": True}) for i in range(5)])
    calls = [
        gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="private"), metadata=other),
        gw_vector.Search(vector_pb2.SearchRequest(collection="private", vector=vec([1, 0])), metadata=other),
        gw_vector.SearchBatch(
            vector_pb2.SearchBatchRequest(
                searches=[vector_pb2.SearchRequest(collection="private", vector=vec([1, 0]))]
            ),
            metadata=other,
        ),
        gw_vector.HybridSearch(
            vector_pb2.HybridSearchRequest(collection="private", vector=vec([1, 0]), text="x"), metadata=other
        ),
        gw_vector.ScrollPoints(vector_pb2.ScrollPointsRequest(collection="private"), metadata=other),
        gw_vector.GetPoints(vector_pb2.GetPointsRequest(collection="private", ids=["p0"]), metadata=other),
        gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="private", points=[point("x", [0, 1])]), metadata=other
        ),
        gw_vector.DeletePoints(
            vector_pb2.DeletePointsRequest(collection="private", filter=filter_pb2.Filter()), metadata=other
        ),
        gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name="private"), metadata=other),
    ]
    for call in calls:
        assert_not_found(await rpc_error(call))
    listed = await gw_vector.ListCollections(vector_pb2.ListCollectionsRequest(), metadata=other)
    assert not listed.collections
    assert await count(gw_vector, md, "private") == 5


async def test_a_same_named_collection_in_another_tenant_is_independent(gw_vector, md, new_tenant):
    other = await new_tenant()
    mine = await create(gw_vector, md, "docs", 2, COSINE)
    theirs = await create(gw_vector, other, "docs", 3, L2, none=vector_pb2.NoIndex())
    assert (mine.dimension, theirs.dimension) == (2, 3)
    await upsert(gw_vector, md, "docs", [point("same-id", [1, 0], {"owner": "me"})])
    await upsert(
        gw_vector, other, "docs", [point("same-id", [0, 0, 1], {"owner": "them"}), point("x", [1, 1, 1])]
    )
    assert await count(gw_vector, md, "docs") == 1 and await count(gw_vector, other, "docs") == 2
    hits = await search(gw_vector, md, "docs", [1, 0], limit=10, with_payload=True)
    assert [(h.id, h.payload["owner"]) for h in hits] == [("same-id", "me")]
    gone = await gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name="docs"), metadata=other)
    assert gone.points_deleted == 2
    got = (
        await gw_vector.GetCollection(vector_pb2.GetCollectionRequest(name="docs"), metadata=md)
    ).collection
    assert (got.dimension, got.point_count) == (2, 1)


async def test_concurrent_deletes_of_different_collections_all_succeed(gw_vector, md, new_tenant):
    other = await new_tenant()
    owners = [(md, "one"), (md, "two"), (other, "one"), (other, "three")]
    for metadata, name in owners:
        await create(gw_vector, metadata, name, 2)
        await upsert(gw_vector, metadata, name, [point(f"p{i}", [1, i]) for i in range(50)])
    results = await asyncio.gather(
        *(
            gw_vector.DeleteCollection(vector_pb2.DeleteCollectionRequest(name=name), metadata=metadata)
            for metadata, name in owners
        ),
        return_exceptions=True,
    )
    failures = [
        (name, r.code(), r.details())
        for (_, name), r in zip(owners, results, strict=True)
        if isinstance(r, BaseException)
    ]
    assert not failures, f"concurrent DeleteCollection calls failed: {failures}"
    assert [r.points_deleted for r in results] == [50, 50, 50, 50]


# -- tenant deletion ----------------------------------------------------------


async def test_deleting_a_tenant_with_cascade_removes_its_vector_collections(
    gw_vector, gw_tenants, admin_metadata, md, slug, settings
):
    await create(gw_vector, md, "c1", 2)
    await create(gw_vector, md, "c2", 3, L2, ivfflat=vector_pb2.IvfflatIndex(lists=2))
    await upsert(gw_vector, md, "c1", [point(f"p{i}", [1, i]) for i in range(10)])
    await upsert(gw_vector, md, "c2", [point(f"p{i}", [1, i, 0]) for i in range(4)])
    owner = await asyncpg.connect(settings.migrate_database_url)
    try:
        await owner.execute("SELECT set_config('strata.tenant_id', $1, false)", slug)
        collection_ids = [
            r["id"] for r in await owner.fetch("SELECT id FROM vector.collections WHERE tenant = $1", slug)
        ]
        assert len(collection_ids) == 2
        index_names = [f"points_{i}" for i in collection_ids]
        assert (
            await owner.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'vector' AND indexname = ANY($1)",
                index_names,
            )
            == 2
        )
        gone = await gw_tenants.DeleteTenant(
            tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=admin_metadata
        )
        assert gone.vector_collections_deleted == 2
        assert await owner.fetchval("SELECT count(*) FROM vector.collections WHERE tenant = $1", slug) == 0
        assert await owner.fetchval("SELECT count(*) FROM vector.points WHERE tenant = $1", slug) == 0
        assert (
            await owner.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'vector' AND indexname = ANY($1)",
                index_names,
            )
            == 0
        )
    finally:
        await owner.close()


async def test_a_tenant_that_owns_only_vector_collections_needs_cascade(
    gw_vector, gw_admin, gw_tenants, admin_metadata, make_key, slug
):
    api_key, key_id = await make_key(slug, READ, WRITE)
    await create(gw_vector, bearer(api_key), "kept", 2)
    await upsert(gw_vector, bearer(api_key), "kept", [point("p", [1, 0])])
    await gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin_metadata)
    # No records, KV keys or working API keys remain: only the collection.
    error = await rpc_error(
        gw_tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(slug=slug), metadata=admin_metadata)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "TENANT_NOT_EMPTY"
    assert info.metadata.get("vector_collections") == "1", dict(info.metadata)


# -- real embeddings ----------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    """all-MiniLM-L6-v2, loaded once: reading the weights costs more than encoding a few sentences."""
    return MiniLM.load()


async def test_real_sentence_embeddings_find_the_semantically_closest_sentence(gw_vector, md, minilm):
    sentences = {
        "cats": "A cat is sleeping on the sofa.",
        "finance": "The central bank raised interest rates again.",
        "football": "The striker scored twice in the final match.",
        "cooking": "Simmer the tomato sauce for twenty minutes.",
        "space": "The rocket launched a satellite into orbit.",
        "weather": "Heavy rain and strong winds are expected tomorrow.",
        "medicine": "The doctor prescribed antibiotics for the infection.",
        "music": "She plays the violin in a symphony orchestra.",
        "computing": "The laptop crashed and lost my unsaved document.",
        "gardening": "Plant the tulip bulbs in autumn before the first frost.",
    }
    embeddings = minilm.encode(list(sentences.values()))
    await create(gw_vector, md, "minilm", embeddings.shape[1], COSINE)
    points = [
        point(key, e.tolist(), text=s) for (key, s), e in zip(sentences.items(), embeddings, strict=True)
    ]
    assert await upsert(gw_vector, md, "minilm", points) == len(sentences)
    # Each question shares no content word with its sentence: only meaning links them.
    questions = {
        "cats": "My kitten naps on the couch",
        "finance": "Monetary policy and borrowing costs",
        "football": "A forward netted two goals in the cup decider",
        "cooking": "How long should a pasta topping stew on the stove?",
        "space": "A spacecraft carried a probe up to circle the Earth",
        "weather": "Is a storm on its way?",
        "medicine": "Which medication treats a bacterial illness?",
        "music": "A musician performing with a string ensemble",
        "computing": "A PC freeze wiped out the file I was editing",
        "gardening": "When do spring flowers go into the soil?",
    }
    queries = dict(zip(questions, minilm.encode(list(questions.values())).tolist(), strict=True))
    for expected, question in questions.items():
        hits = await search(gw_vector, md, "minilm", queries[expected], limit=3)
        assert hits[0].id == expected, (question, [(h.id, round(h.score, 3)) for h in hits])
    # The same points through HybridSearch: the cat question's nearest sentence is about
    # cats, but the only text match for "violin" is fused above it.
    response = await gw_vector.HybridSearch(
        vector_pb2.HybridSearchRequest(
            collection="minilm", vector=vec(queries["cats"]), text="violin", limit=3, with_payload=True
        ),
        metadata=md,
    )
    hits = list(response.hits)
    assert [h.id for h in hits[:2]] == ["music", "cats"], [(h.id, round(h.score, 4)) for h in hits]
    assert hits[0].text == sentences["music"]
    assert hits[0].score > hits[1].score == pytest.approx(1 / 61), "cats: first by vector, no text match"


async def test_a_zero_vector_is_refused_in_a_cosine_collection_only(gw_vector, md):
    await create(gw_vector, md, "zeros-cos", 3, COSINE)
    await create(gw_vector, md, "zeros-l2", 3, vector_pb2.METRIC_L2)
    error = await rpc_error(
        gw_vector.UpsertPoints(
            vector_pb2.UpsertPointsRequest(collection="zeros-cos", points=[point("z", [0, 0, 0])]),
            metadata=md,
        )
    )
    assert_invalid(error, "points[0].vector")
    assert await count(gw_vector, md, "zeros-cos") == 0
    assert_invalid(await rpc_error(search(gw_vector, md, "zeros-cos", [0, 0, 0])), "vector")
    assert await upsert(gw_vector, md, "zeros-l2", [point("z", [0, 0, 0])]) == 1
    hits = await search(gw_vector, md, "zeros-l2", [0, 0, 0], limit=1)
    assert [h.id for h in hits] == ["z"] and hits[0].distance == 0

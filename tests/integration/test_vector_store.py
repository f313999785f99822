"""services/vector/store.py on the session's Postgres: the SQL of every vector RPC, as typed rows.

Each test runs as a tenant of its own; row-level security is the store's
only tenant filter, so another tenant's transaction must see nothing.
"""

from __future__ import annotations

import json
import uuid

import pytest
from strata.vector.v1 import vector_pb2

from services.vector.model import HNSW, NO_INDEX, CollectionRow, IndexSpec, PointRow
from services.vector.store import VectorStore
from shared.storage.db import Database
from tests.support.documents import cond, make

TIMEOUT_S = 10.0
L2 = vector_pb2.METRIC_L2


@pytest.fixture
def store(db: Database) -> VectorStore:
    return VectorStore(db)


@pytest.fixture
def tenant() -> str:
    return f"vs-{uuid.uuid4().hex[:8]}"


async def collection_of(
    store: VectorStore, tenant: str, *, points: int = 0, payload_bytes: int = 0
) -> CollectionRow:
    """A 2-dimension L2 collection (no index) with ``points`` points at [1, i], payloads of ``payload_bytes``."""
    async with store.transaction(tenant, timeout=TIMEOUT_S) as tx:
        row = await tx.insert_collection(tenant, "c", 2, L2, IndexSpec(NO_INDEX, 16, 64, 100))
        assert row is not None
        blob = json.dumps({"blob": "x" * payload_bytes, "even": True})
        rows = [
            PointRow(f"p{i:03}", str([1.0, float(i)]), blob if i % 2 == 0 else '{"even": false}', f"text {i}")
            for i in range(points)
        ]
        if rows:
            assert await tx.upsert_points(tenant, row.collection, rows) == points
    return row


async def test_a_collection_is_created_once_listed_rebuilt_and_deleted_with_its_points(store, tenant):
    row = await collection_of(store, tenant, points=5)
    async with store.transaction(tenant, timeout=TIMEOUT_S) as tx:
        assert await tx.insert_collection(tenant, "c", 2, L2, IndexSpec(NO_INDEX, 16, 64, 100)) is None
        assert [r.collection.name for r in await tx.list_collections("", 10)] == ["c"]
        rebuilt = await tx.rebuild_index(row, IndexSpec(HNSW, 8, 32, 100))
        assert (rebuilt.index.kind, rebuilt.index.m, rebuilt.index.ef_construction) == (HNSW, 8, 32)
        assert rebuilt.collection.id == row.collection.id and rebuilt.created_at == row.created_at
        assert await tx.count_points(rebuilt.collection) == 5
        assert await tx.delete_collection(row.collection.id) == 5
        assert await tx.collection_row("c") is None


async def test_another_tenant_sees_none_of_it(store, tenant):
    await collection_of(store, tenant, points=3)
    async with store.transaction(f"{tenant}-other", timeout=TIMEOUT_S) as tx:
        assert await tx.collection_row("c") is None
        assert await tx.list_collections("", 10) == []


async def test_points_are_got_counted_filtered_deleted_and_scrolled_by_id(store, tenant):
    row = await collection_of(store, tenant, points=6)
    collection = row.collection
    async with store.transaction(tenant, timeout=TIMEOUT_S) as tx:
        got, cut = await tx.get_points(
            collection, ["p001", "nope"], with_vectors=True, with_payload=True, budget=1 << 20
        )
        assert not cut and got == [PointRow("p001", "[1,1]", '{"even": false}', "text 1")]
        bare, _ = await tx.get_points(
            collection, ["p001"], with_vectors=False, with_payload=False, budget=1 << 20
        )
        assert bare == [PointRow("p001", None, None, None)]
        evens = make(cond("even", "EQ", True))
        assert await tx.count_points(collection, evens) == 3
        page, cut = await tx.scroll(
            collection, "p001", 3, None, with_vectors=False, with_payload=False, budget=1 << 20
        )
        assert [p.id for p in page] == ["p002", "p003", "p004"] and not cut
        assert await tx.delete_points(collection, None, evens) == 3
        assert await tx.delete_points(collection, ["p001", "p999"], None) == 1
        assert await tx.count_points(collection) == 2


async def test_reads_are_cut_where_their_payloads_pass_the_budget(store, tenant):
    row = await collection_of(store, tenant, points=10, payload_bytes=10_000)  # five of them heavy
    collection = row.collection
    async with store.transaction(tenant, timeout=TIMEOUT_S) as tx:
        page, cut = await tx.scroll(
            collection, "", 100, None, with_vectors=False, with_payload=True, budget=25_000
        )
        # ~10 kB each even point, ~90 bytes each odd one: the third even point passes 25 kB.
        assert cut and [p.id for p in page] == ["p000", "p001", "p002", "p003"]
        names, cut = await tx.scroll(
            collection, "", 100, None, with_vectors=False, with_payload=False, budget=25_000
        )
        assert not cut and len(names) == 10
        ids = [f"p{i:03}" for i in range(10)]
        _, cut = await tx.get_points(collection, ids, with_vectors=False, with_payload=True, budget=25_000)
        assert cut
        hits, past = await tx.nearest(
            collection, "[1, 0]", 10, None, exact=True, with_vectors=False, with_payload=True, budget=25_000
        )
        assert [h.point.id for h in hits] == ["p000", "p001", "p002", "p003"]
        assert past is not None and past.point.id == "p004" and past.distance == 4.0


async def test_nearest_and_hybrid_rank_points(store, tenant):
    row = await collection_of(store, tenant, points=8)
    collection = row.collection
    async with store.transaction(tenant, timeout=TIMEOUT_S) as tx:
        hits, past = await tx.nearest(
            collection, "[1, 2.2]", 3, None, exact=True, with_vectors=True, with_payload=False, budget=1 << 20
        )
        assert past is None
        assert [(h.point.id, round(h.distance, 3)) for h in hits] == [
            ("p002", 0.2),
            ("p003", 0.8),
            ("p001", 1.2),
        ]
        assert hits[0].point.embedding == "[1,2]" and hits[0].point.payload is None
        fused, cut = await tx.hybrid(
            collection, "[1, 7]", "text 2", 2, 8, 60, None, with_payload=True, budget=1 << 20
        )
        assert not cut and len(fused) == 2
        assert fused[0].fused_score >= fused[1].fused_score > 0
        assert {h.point.id for h in fused} <= {f"p{i:03}" for i in range(8)}


async def test_a_store_remembers_collections_per_tenant_and_forgets_them(store, tenant):
    row = await collection_of(store, tenant)
    store.remember(tenant, row.collection)
    assert store.known(tenant, "c") == row.collection
    assert store.known(f"{tenant}-other", "c") is None
    store.forget(tenant, "c")
    assert store.known(tenant, "c") is None

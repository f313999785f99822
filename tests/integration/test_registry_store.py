"""services/tenants/registry/store.py on the session's Postgres: the registry's statements, as typed rows."""

from __future__ import annotations

import json
import uuid

import pytest
from strata.tenants.v1 import tenants_pb2

from services.tenants.records.store import RecordStore
from services.tenants.registry.store import TenantStore
from shared.api.callers import OPERATOR_SCOPE, Caller, set_current_caller
from shared.storage.db import Database

TIMEOUT_S = 10.0
ACTIVE, SUSPENDED = tenants_pb2.TENANT_STATUS_ACTIVE, tenants_pb2.TENANT_STATUS_SUSPENDED


OPERATOR = Caller(
    "dev", frozenset({OPERATOR_SCOPE}), "registry-test", "/strata.tenants.v1.TenantService/Test"
)


@pytest.fixture
def store(db: Database) -> TenantStore:
    return TenantStore(db)


@pytest.fixture
def slug() -> str:
    return f"reg-{uuid.uuid4().hex[:8]}"


async def test_a_tenant_is_made_once_found_by_id_or_slug_and_listed(store, slug):
    async with store.transaction(slug, timeout=TIMEOUT_S) as tx:
        made = await tx.insert_tenant(slug, "Acme", ACTIVE, "pro", '{"tier": 2}')
    assert made is not None and (made.slug, made.version, json.loads(made.metadata)) == (slug, 1, {"tier": 2})
    async with store.transaction(slug, timeout=TIMEOUT_S) as tx:
        assert await tx.insert_tenant(slug, "", ACTIVE, "", "{}") is None
    assert await store.find("id", made.id, timeout=TIMEOUT_S) == made
    assert await store.find("slug", slug, timeout=TIMEOUT_S) == made
    listed, cut = await store.list_tenants(ACTIVE, slug[:-1], 1000, budget=1 << 30, timeout=TIMEOUT_S)
    assert made in listed and all(row.status == ACTIVE for row in listed) and not cut
    async with store.transaction(f"{slug}-b", timeout=TIMEOUT_S) as tx:
        second = await tx.insert_tenant(f"{slug}-b", "Acme", ACTIVE, "pro", '{"tier": 2}')
    # Each row counts about 160 bytes (metadata, names, plan, id, framing): 200 hold one.
    both, cut = await store.list_tenants(ACTIVE, slug[:-1], 1000, budget=1 << 30, timeout=TIMEOUT_S)
    assert both[:2] == [made, second] and not cut
    few, cut = await store.list_tenants(ACTIVE, slug[:-1], 1000, budget=200, timeout=TIMEOUT_S)
    assert cut and few == [made]
    none, cut = await store.list_tenants(ACTIVE, slug[:-1], 1000, budget=1, timeout=TIMEOUT_S)
    assert cut and none == []


async def test_an_update_sets_the_named_fields_at_a_version_and_is_audited(store, slug, db):
    set_current_caller(OPERATOR)  # changes are audited as the call's caller (this test's task only)
    async with store.transaction(slug, timeout=TIMEOUT_S) as tx:
        made = await tx.insert_tenant(slug, "Acme", ACTIVE, "free", "{}")
    assert made is not None
    updated = await store.update(
        "slug",
        slug,
        1,
        {"status": SUSPENDED, "plan": "pro"},
        details=lambda r: {"v": r.version},
        timeout=TIMEOUT_S,
    )
    assert updated is not None and (updated.status, updated.plan, updated.version) == (SUSPENDED, "pro", 2)
    assert updated.display_name == "Acme"
    stale = await store.update("slug", slug, 1, {"plan": "x"}, details=lambda r: {}, timeout=TIMEOUT_S)
    assert stale is None
    audited = await db.fetchval(
        "SELECT count(*) FROM admin.audit_log WHERE target = $1", f"tenant/{slug}", timeout=TIMEOUT_S
    )
    assert audited == 1


async def test_a_tenants_rows_are_counted_and_purged_in_its_own_transaction(store, slug, db):
    records = RecordStore(db)
    for i in range(3):
        await records.create(slug, "c", f"r{i}", "{}", "", timeout=TIMEOUT_S)
    await records.create(f"{slug}-other", "c", "r0", "{}", "", timeout=TIMEOUT_S)
    async with store.transaction(slug, timeout=TIMEOUT_S) as tx:
        owned = await tx.owned(slug)
        assert owned == {"records": 3, "kv_keys": 0, "api_keys": 0, "vector_collections": 0}
        purged = await tx.purge_rows()
    assert sorted(r[1] for r in purged.records) == ["r0", "r1", "r2"] and purged.vector_collections == 0
    async with store.transaction(slug, timeout=TIMEOUT_S, read_only=True) as tx:
        assert (await tx.owned(slug))["records"] == 0
    assert await records.get(f"{slug}-other", "c", "r0", timeout=TIMEOUT_S) is not None


async def test_indexes_are_declared_once_and_listed(store):
    set_current_caller(OPERATOR)
    collection = f"ix{uuid.uuid4().hex[:8]}"
    made, created = await store.declare_index(collection, "score", timeout=TIMEOUT_S)
    again, created_again = await store.declare_index(collection, "score", timeout=TIMEOUT_S)
    assert created and not created_again and again == made
    assert await store.list_indexes(collection, timeout=TIMEOUT_S) == [made]

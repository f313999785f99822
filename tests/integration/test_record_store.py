"""services/tenants/records/store.py on the session's Postgres: every record statement, as typed rows."""

from __future__ import annotations

import json
import uuid

import pytest

from services.tenants.records.checks import OrderBy
from services.tenants.records.store import EtagMismatch, RecordNotFound, RecordStore
from shared.api.answers import OverBudget
from shared.storage.db import Database
from tests.support.documents import cond, make

TIMEOUT_S = 10.0
BY_ID = OrderBy("id", "", descending=False)


@pytest.fixture
def store(db: Database) -> RecordStore:
    return RecordStore(db)


@pytest.fixture
def tenant() -> str:
    return f"rs-{uuid.uuid4().hex[:8]}"


async def test_create_is_once_per_id_and_a_retry_with_its_request_id_gets_the_same_record(store, tenant):
    made = await store.create(tenant, "c", "a", '{"n": 1}', "req-1", timeout=TIMEOUT_S)
    assert made is not None and (made.id, json.loads(made.data), made.revision) == ("a", {"n": 1}, 1)
    retried = await store.create(tenant, "c", "other-id", '{"n": 2}', "req-1", timeout=TIMEOUT_S)
    assert retried == made
    assert await store.create(tenant, "c", "a", "{}", "", timeout=TIMEOUT_S) is None
    assert await store.get(tenant, "c", "a", timeout=TIMEOUT_S) == made
    assert await store.get(f"{tenant}-other", "c", "a", timeout=TIMEOUT_S) is None  # row-level security


async def test_an_update_sees_the_locked_document_and_checks_the_version(store, tenant):
    made = await store.create(tenant, "c", "a", '{"n": 1}', "", timeout=TIMEOUT_S)
    assert made is not None
    seen: list[str] = []

    def bump(current: str) -> str:
        seen.append(current)
        return json.dumps({"n": json.loads(current)["n"] + 1})

    updated = await store.update(tenant, "c", "a", made.cache_version, bump, timeout=TIMEOUT_S)
    assert json.loads(seen[0]) == {"n": 1} and json.loads(updated.data) == {"n": 2}
    assert updated.revision == 2 and updated.cache_version > made.cache_version
    with pytest.raises(EtagMismatch):
        await store.update(tenant, "c", "a", made.cache_version, bump, timeout=TIMEOUT_S)
    with pytest.raises(RecordNotFound):
        await store.update(tenant, "c", "nope", None, bump, timeout=TIMEOUT_S)
    with pytest.raises(EtagMismatch):
        await store.delete(tenant, "c", "a", made.cache_version, timeout=TIMEOUT_S)
    row, tombstone = await store.delete(tenant, "c", "a", updated.cache_version, timeout=TIMEOUT_S)
    assert row == updated and tombstone > updated.cache_version
    with pytest.raises(RecordNotFound):
        await store.delete(tenant, "c", "a", None, timeout=TIMEOUT_S)


async def test_get_many_refuses_past_its_budget(store, tenant):
    for i in range(4):
        await store.create(tenant, "c", f"r{i}", json.dumps({"blob": "x" * 1000}), "", timeout=TIMEOUT_S)
    ids = [f"r{i}" for i in range(4)] + ["absent"]
    got = await store.get_many(tenant, "c", ids, budget=10_000, timeout=TIMEOUT_S)
    assert [r.id for r in got] == ["r0", "r1", "r2", "r3"]
    with pytest.raises(OverBudget):
        await store.get_many(tenant, "c", ids, budget=2_500, timeout=TIMEOUT_S)


async def test_pages_follow_their_order_and_cursor_and_end_at_the_byte_budget(store, tenant):
    for i in range(6):
        size = 1000 if i % 2 else 10
        await store.create(
            tenant, "c", f"r{i}", json.dumps({"rank": 6 - i, "blob": "x" * size}), "", timeout=TIMEOUT_S
        )
    first = await store.list_page(
        tenant, "c", None, BY_ID, None, 4, include_total=True, budget=1 << 20, timeout=TIMEOUT_S
    )
    assert [r.id for r in first.rows] == ["r0", "r1", "r2", "r3"] and not first.cut and first.total == 6
    assert first.cursor == [first.rows[-1].id, "r3"]
    rest = await store.list_page(
        tenant, "c", None, BY_ID, first.cursor, 4, include_total=False, budget=1 << 20, timeout=TIMEOUT_S
    )
    assert [r.id for r in rest.rows] == ["r4", "r5"] and rest.cursor is None
    by_rank = OrderBy("json", "rank", descending=False)
    ranked = await store.list_page(
        tenant,
        "c",
        make(cond("rank", "GT", 2)),
        by_rank,
        None,
        10,
        include_total=True,
        budget=1 << 20,
        timeout=TIMEOUT_S,
    )
    assert [r.id for r in ranked.rows] == ["r3", "r2", "r1", "r0"] and ranked.total == 4
    cut = await store.list_page(
        tenant, "c", None, BY_ID, None, 10, include_total=False, budget=2_000, timeout=TIMEOUT_S
    )
    # r1 and r3 hold about 1.1 kB each, the others about 100 bytes: r3 would pass 2 kB.
    assert cut.cut and [r.id for r in cut.rows] == ["r0", "r1", "r2"] and cut.cursor == ["r2", "r2"]

"""Declared indexes: made by the SECURITY DEFINER function, used by filters on their path."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from strata.common.v1 import filter_pb2

from shared.storage.db import Database
from shared.storage.filters import SqlParams, compile_filter
from tests.support.documents import cond


async def explain(db: Database, tenant: str, collection: str, filter_: filter_pb2.Filter) -> str:
    """The plan of ListRecords' query (default order, first page) for ``filter_``; no planner settings."""
    params = SqlParams()
    c = params.add(collection)
    where = compile_filter(filter_, "data", params)
    async with db.tenant_transaction(tenant, read_only=True) as conn:
        rows = await conn.fetch(
            f"EXPLAIN SELECT collection, id, data FROM tenants.records WHERE collection = {c} AND {where} "
            "ORDER BY created_at ASC NULLS LAST, id ASC LIMIT 51",
            *params.values,
        )
    return "\n".join(r[0] for r in rows)


async def test_a_declared_index_serves_filters_on_its_path(db, settings):
    tenant, collection = "idx-tenant", f"idx-{uuid.uuid4().hex[:8]}"
    async with db.tenant_transaction(tenant) as conn:
        await conn.executemany(
            "INSERT INTO tenants.records (tenant, collection, id, data) VALUES ($1, $2, $3, $4::jsonb)",
            [
                (tenant, collection, f"r{i}", json.dumps({"score": i, "name": f"n{i:05d}"}))
                for i in range(20000)
            ],
        )
    created = await db.fetchrow("SELECT * FROM tenants.declare_index($1, 'score')", collection)
    again = await db.fetchrow("SELECT * FROM tenants.declare_index($1, 'score')", collection)
    assert (
        created["r_created"] is True and again["r_created"] is False and again["r_name"] == created["r_name"]
    )
    named = await db.fetchrow("SELECT * FROM tenants.declare_index($1, 'name')", collection)
    owner = await asyncpg.connect(settings.migrate_database_url)
    try:
        await owner.execute("ANALYZE tenants.records")
    finally:
        await owner.close()
    cases = [
        # jsonb comparisons use the jsonb index; string ranges and prefixes its text twin.
        (cond("score", "OPERATOR_EQ", 42), created["r_name"], "{score}"),
        (cond("score", "OPERATOR_GT", 19990), created["r_name"], "{score}"),
        (cond("name", "OPERATOR_EQ", "n00042"), named["r_name"], "{name}"),
        (cond("name", "OPERATOR_LT", "n00010"), f"{named['r_name']}_text", "{name}"),
        (cond("name", "OPERATOR_GTE", "n19990"), f"{named['r_name']}_text", "{name}"),
        (cond("name", "OPERATOR_PREFIX", "n1999"), f"{named['r_name']}_text", "{name}"),
    ]
    for filter_, index, path in cases:
        plan = await explain(db, tenant, collection, filter_)
        assert index in plan, plan
        # The JSON path itself is an index condition, not a filter applied after the scan.
        assert any("Index Cond" in line and path in line for line in plan.splitlines()), plan


@pytest.mark.parametrize(
    ("collection", "path"),
    [
        ("ok", "a b"),
        ("ok", "a'); DROP TABLE tenants.records; --"),
        ("bad name", "a"),
        ("ok", ""),
        ("ok", "a..b"),
    ],
)
async def test_the_function_refuses_bad_names_itself(db, collection, path):
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await db.fetchrow("SELECT * FROM tenants.declare_index($1, $2)", collection, path)


async def test_the_service_role_still_cannot_create_indexes_directly(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE INDEX sneaky ON tenants.records ((data #> '{x}'))")
    finally:
        await conn.close()

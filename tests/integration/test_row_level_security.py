"""Postgres itself keeps tenants apart: row-level security on tenants.records."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from shared.storage.db import Database


@pytest.fixture
def collection() -> str:
    return f"rls-{uuid.uuid4().hex[:8]}"


async def insert(db: Database, tenant: str, collection: str, record_id: str) -> None:
    async with db.tenant_transaction(tenant) as conn:
        await conn.execute(
            "INSERT INTO tenants.records (tenant, collection, id, data) VALUES ($1, $2, $3, '{}')",
            tenant,
            collection,
            record_id,
        )


async def test_an_unfiltered_query_sees_only_the_current_tenants_rows(db, collection):
    await insert(db, "rls-a", collection, "a1")
    await insert(db, "rls-a", collection, "a2")
    await insert(db, "rls-b", collection, "b1")
    async with db.tenant_transaction("rls-a") as conn:
        # Deliberately no tenant condition: the policy is the only filter.
        rows = await conn.fetch(
            "SELECT tenant, id FROM tenants.records WHERE collection = $1 ORDER BY id", collection
        )
    assert [(r["tenant"], r["id"]) for r in rows] == [("rls-a", "a1"), ("rls-a", "a2")]


async def test_without_a_tenant_setting_no_row_is_visible(db, collection):
    await insert(db, "rls-a", collection, "a1")
    async with db.transaction() as conn:
        assert await conn.fetchval("SELECT count(*) FROM tenants.records") == 0


async def test_a_row_for_another_tenant_cannot_be_written(db, collection):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.tenant_transaction("rls-a") as conn:
            await conn.execute(
                "INSERT INTO tenants.records (tenant, collection, id, data) VALUES ('rls-b', $1, 'x', '{}')",
                collection,
            )
    await insert(db, "rls-b", collection, "b1")
    async with db.tenant_transaction("rls-a") as conn:
        updated = await conn.execute(
            "UPDATE tenants.records SET data = '{\"owned\": true}' WHERE collection = $1", collection
        )
        deleted = await conn.execute("DELETE FROM tenants.records WHERE collection = $1", collection)
    assert updated == "UPDATE 0" and deleted == "DELETE 0"


async def test_the_tenant_setting_does_not_leak_to_the_next_user_of_the_connection(db, collection):
    await insert(db, "rls-a", collection, "a1")
    async with db.tenant_transaction("rls-a") as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert (
            await conn.fetchval("SELECT count(*) FROM tenants.records WHERE collection = $1", collection) == 1
        )
    async with db.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid, "a different connection proves nothing"
        assert await conn.fetchval("SELECT current_setting('strata.tenant_id', true)") in (None, "")
        assert (
            await conn.fetchval("SELECT count(*) FROM tenants.records WHERE collection = $1", collection) == 0
        )


async def test_the_service_role_cannot_switch_security_off(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE tenants.records DISABLE ROW LEVEL SECURITY")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DROP POLICY records_of_the_current_tenant ON tenants.records")
        forced = await conn.fetchval(
            "SELECT relforcerowsecurity AND relrowsecurity FROM pg_class WHERE oid = 'tenants.records'::regclass"
        )
        assert forced is True
    finally:
        await conn.close()


@pytest.mark.parametrize("table", ["tenants.records", "vector.collections", "vector.points"])
async def test_every_tenant_scoped_table_forces_row_level_security(settings, table):
    conn = await asyncpg.connect(settings.database_url)
    try:
        forced = await conn.fetchval(
            "SELECT relforcerowsecurity AND relrowsecurity FROM pg_class WHERE oid = $1::regclass", table
        )
        policies = await conn.fetchval(
            "SELECT count(*) FROM pg_policies WHERE schemaname || '.' || tablename = $1", table
        )
        assert forced is True and policies == 1
    finally:
        await conn.close()

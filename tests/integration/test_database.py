"""The database foundation: migrations, roles, and the pool's connection hygiene."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from devstack.launcher import SERVICES
from shared.api.errors import Code
from shared.storage.db import Database
from shared.storage.migrations import (
    Migration,
    MigrationError,
    apply_migrations,
    discover,
    migration_plan,
    status,
)


async def test_applying_migrations_twice_is_a_no_op(settings):
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        assert await apply_migrations(conn, migration_plan(tuple(SERVICES))) == []
        assert (await status(conn))["kv"] == len(discover("kv", Path("services/kv/migrations")))
    finally:
        await conn.close()


async def test_a_changed_applied_migration_is_refused(settings):
    plan = migration_plan(tuple(SERVICES))
    edited = [replace(plan[0], sql=plan[0].sql + "\n-- edited"), *plan[1:]]
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, edited)
    finally:
        await conn.close()


async def test_a_new_migration_is_applied_once_under_the_lock(settings):
    extra = Migration(
        "scratch", 1, "scratch_table", "CREATE SCHEMA scratch; CREATE TABLE scratch.t (id int);"
    )
    conn1 = await asyncpg.connect(settings.migrate_database_url)
    conn2 = await asyncpg.connect(settings.migrate_database_url)
    try:
        results = await asyncio.gather(apply_migrations(conn1, [extra]), apply_migrations(conn2, [extra]))
        assert sorted(len(r) for r in results) == [0, 1]
        assert await conn1.fetchval("SELECT count(*) FROM scratch.t") == 0
    finally:
        await conn1.execute(
            "DROP SCHEMA scratch CASCADE; DELETE FROM strata_migrations WHERE schema_name='scratch'"
        )
        await conn1.close()
        await conn2.close()


def test_migration_files_must_be_numbered_without_gaps(tmp_path):
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "0003_third.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        discover("x", tmp_path)


async def test_service_role_is_no_superuser_owns_nothing_and_cannot_bypass_rls(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        role = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
        )
        assert dict(role) == {
            "rolsuper": False,
            "rolbypassrls": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
        }
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = current_user AND c.relpersistence <> 't'"  # session temp tables are scratch
        )
        assert owned == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DROP TABLE kv.entries")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE kv.sneaky (id int)")
    finally:
        await conn.close()


async def test_embedded_postgres_refuses_connections_without_the_password(settings, backends):
    if backends.postgres is None:
        pytest.skip("embedded mode only")
    port = backends.postgres.port
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/strata")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres:wrong@127.0.0.1:{port}/strata")


async def test_nothing_leaks_to_the_next_user_of_a_pooled_connection(settings):
    db = await Database.open(settings.database_url, min_size=1, max_size=1)
    try:
        async with db.transaction() as conn:
            await conn.execute("SELECT set_config('strata.tenant_id', 'tenant-a', true)")
            first_pid = await conn.fetchval("SELECT pg_backend_pid()")
        # An abandoned transaction (as on a cancelled call) is rolled back on release.
        async with db.pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT set_config('strata.tenant_id', 'tenant-b', true)")
        async with db.pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == first_pid, "not the same connection"
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT current_setting('strata.tenant_id', true)") in (None, "")
    finally:
        await db.close()


async def test_a_statement_past_its_timeout_is_cancelled_in_postgres(settings):

    from shared.api.errors import from_exception

    db = await Database.open(settings.database_url, min_size=1, max_size=2)
    try:
        with pytest.raises(TimeoutError) as caught:
            await db.fetchval("SELECT pg_sleep(10) /* strata-timeout-probe */", timeout=0.3)
        assert from_exception(caught.value).code == Code.DEADLINE_EXCEEDED
        assert db.breaker.failures == 0, "a timeout is not a connection fault"
        await asyncio.sleep(0.2)
        running = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%strata-timeout-probe%' AND pid <> pg_backend_pid()"
        )
        assert running == 0
    finally:
        await db.close()


def test_deadline_timeout_follows_the_call_and_refuses_a_passed_deadline():

    from shared.api.errors import StrataError
    from shared.storage.db import deadline_timeout

    class Call:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    assert deadline_timeout(Call(None), cap=30.0) == 30.0
    assert deadline_timeout(Call(2.5), cap=30.0) == 2.5
    assert deadline_timeout(Call(100.0), cap=30.0) == 30.0
    with pytest.raises(StrataError) as caught:
        deadline_timeout(Call(0.0))
    assert caught.value.code == Code.DEADLINE_EXCEEDED


def test_migrate_command_brings_an_external_database_up_to_date(settings):
    import os
    import subprocess
    import sys

    env = dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url)
    env["STRATA_MIGRATE_DATABASE_URL"] = settings.migrate_database_url
    done = subprocess.run(
        [sys.executable, "-m", "shared.storage.migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout


def test_migrate_command_refuses_embedded_mode():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "shared.storage.migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr

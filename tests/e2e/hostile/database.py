"""The database as its owner sees it: a digest of every row and of the catalog outside some tenants,
the KV revision, and what changed between two digests."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from shared.config.settings import Settings
from tests.e2e.hostile.rpcs import HOSTILE_STRINGS

_SCHEMAS = ["kv", "tenants", "vector", "admin", "public"]
# Single-row counters every write anywhere moves.
_COUNTERS = {"kv.store_revision", "kv.compaction"}


async def kv_revision(settings: Settings) -> int:
    """The KV store's current revision (every KV write moves it)."""
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        return int(await conn.fetchval("SELECT current FROM kv.store_revision"))
    finally:
        await conn.close()


async def database_snapshot(
    settings: Settings, exclude: Sequence[str], since: int
) -> dict[str, frozenset[str]]:
    """A digest of every row, and of the catalog, outside the tenants in ``exclude``.

    Rows with a TTL are left out (they expire on their own), and so are the
    change log's expiry events and its history up to revision ``since``
    (compaction may forget it): any row written for another tenant after
    ``since`` still shows.
    """
    # Declared indexes serve every tenant; the attacker's declarations are keyed by its
    # collection names (its own, or a hostile string the service found valid).
    others = [*exclude, *(s for s in HOSTILE_STRINGS if "\x00" not in s)]
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema = ANY($1::text[]) AND table_type = 'BASE TABLE'",
            _SCHEMAS,
        )
        digest: dict[str, frozenset[str]] = {}
        for schema, table in tables:
            name = f"{schema}.{table}"
            if name in _COUNTERS:
                continue
            columns = {
                row["column_name"]
                for row in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = $1 AND table_name = $2",
                    schema,
                    table,
                )
            }
            where = [
                f"{column} <> ALL($1::text[])"
                for column in ("tenant", "actor_tenant", "slug")
                if column in columns
            ]
            if "collection" in columns and "tenant" not in columns:
                where.append("collection <> ALL($1::text[])")
            if "expires_at" in columns:
                where.append("expires_at IS NULL")
            if name == "kv.changes":
                where.append(f"kind <> 3 AND revision > {int(since)}")
            sql = (
                f'SELECT md5(t::text) AS h FROM "{schema}"."{table}" t WHERE {" AND ".join(where) or "true"}'
            )
            rows = await conn.fetch(sql, others) if "$1" in sql else await conn.fetch(sql)
            digest[name] = frozenset(row["h"] for row in rows)
        catalog = await conn.fetch(
            "SELECT format('%s.%s %s rls=%s forced=%s owner=%s', n.nspname, c.relname, c.relkind, "
            "c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)) AS entry "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') "
            "UNION ALL SELECT format('policy %s.%s %s %s %s', schemaname, tablename, policyname, qual, with_check) "
            "FROM pg_policies "
            "UNION ALL SELECT format('function %s definer=%s %s', p.oid::regprocedure, p.prosecdef, md5(p.prosrc)) "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY($1::text[]) "
            "UNION ALL SELECT format('role %s super=%s createrole=%s createdb=%s bypassrls=%s', rolname, "
            "rolsuper, rolcreaterole, rolcreatedb, rolbypassrls) FROM pg_roles "
            "UNION ALL SELECT 'database ' || datname FROM pg_database",
            _SCHEMAS,
        )
        digest["catalog"] = frozenset(row["entry"] for row in catalog)
        return digest
    finally:
        await conn.close()


def changed_rows(before: dict[str, frozenset[str]], after: dict[str, frozenset[str]]) -> dict[str, int]:
    """Per table, rows that appeared, vanished or changed between two snapshots."""
    diff = {
        name: len(before.get(name, frozenset()) ^ after.get(name, frozenset())) for name in {*before, *after}
    }
    return {name: count for name, count in diff.items() if count}

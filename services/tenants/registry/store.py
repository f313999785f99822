"""All of TenantService's SQL: the registry (tenants.tenants), declared record indexes, and the
rows a tenant owns, counted and purged, as typed rows.

A tenant's rows are counted and purged in a tenant transaction of that
tenant (:meth:`TenantStore.transaction`): row-level security shows its
records and vector collections alone; KV keys and API keys are counted by
their tenant column (reads only: other services remove their own). Every
change to the registry is audited in its own transaction.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from shared.api.answers import ROW_OVERHEAD_BYTES, cut_by_bytes, split_at_budget
from shared.storage.audit import record_audit
from shared.storage.db import Database

__all__ = ["IndexRow", "PurgedRows", "RegistryTx", "TenantRow", "TenantStore"]

_COLUMNS = "id, slug, display_name, status, plan, metadata, version, created_at, updated_at"
_BY = ("id", "slug")


@dataclass(frozen=True, slots=True)
class TenantRow:
    """A row of tenants.tenants; ``metadata`` is JSON text."""

    id: str
    slug: str
    display_name: str
    status: int
    plan: str
    metadata: str
    version: int
    created_at: datetime.datetime
    updated_at: datetime.datetime


class IndexRow(NamedTuple):
    """A declared index on a JSON path of a record collection."""

    collection: str
    path: str
    name: str
    created_at: datetime.datetime


class PurgedRows(NamedTuple):
    """What :meth:`RegistryTx.purge_rows` deleted."""

    records: list[tuple[str, str, int]]  # (collection, id, the tombstone's cache version)
    vector_collections: int


class RegistryTx:
    """The statements of one registry change, in one tenant transaction of the tenant concerned."""

    def __init__(self, conn: asyncpg.Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout

    async def insert_tenant(
        self, slug: str, display_name: str, status: int, plan: str, metadata: str
    ) -> TenantRow | None:
        """The new tenant; None when the slug is taken. The slug's unique index orders this
        against a concurrent create or delete of the same slug: the insert waits for the other."""
        row = await self._conn.fetchrow(
            f"INSERT INTO tenants.tenants (slug, display_name, status, plan, metadata) "
            f"VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (slug) DO NOTHING RETURNING {_COLUMNS}",
            slug,
            display_name,
            status,
            plan,
            metadata,
            timeout=self._timeout,
        )
        return None if row is None else _tenant(row)

    async def lock(self, tenant_id: str) -> TenantRow | None:
        """The tenant row, locked until the transaction ends; None if it is gone."""
        row = await self._conn.fetchrow(
            f"SELECT {_COLUMNS} FROM tenants.tenants WHERE id = $1 FOR UPDATE",
            tenant_id,
            timeout=self._timeout,
        )
        return None if row is None else _tenant(row)

    async def delete_tenant(self, tenant_id: str) -> None:
        await self._conn.execute(
            "DELETE FROM tenants.tenants WHERE id = $1", tenant_id, timeout=self._timeout
        )

    async def owned(self, tenant: str) -> dict[str, int]:
        """What ``tenant`` still owns: records, kv_keys, api_keys (working ones), vector_collections."""
        conn, timeout = self._conn, self._timeout
        records = await conn.fetchval("SELECT count(*) FROM tenants.records", timeout=timeout)
        kv_keys = await conn.fetchval(
            "SELECT count(*) FROM kv.entries WHERE tenant = $1", tenant, timeout=timeout
        )
        api_keys = await conn.fetchval(
            "SELECT count(*) FROM admin.api_keys WHERE tenant = $1 AND revoked_at IS NULL",
            tenant,
            timeout=timeout,
        )
        collections = await conn.fetchval("SELECT count(*) FROM vector.collections", timeout=timeout)
        return {
            "records": int(records),
            "kv_keys": int(kv_keys),
            "api_keys": int(api_keys),
            "vector_collections": int(collections),
        }

    async def purge_rows(self) -> PurgedRows:
        """Delete the records and vector collections this tenant transaction shows.

        The caller commits, then tombstones the records in the cache
        (:meth:`services.tenants.registry.purge.TenantPurge.forget`).
        """
        conn, timeout = self._conn, self._timeout
        gone = await conn.fetch(
            "DELETE FROM tenants.records "
            "RETURNING collection, id, nextval('tenants.record_versions') AS version",
            timeout=timeout,
        )
        # Vector collections (RLS: only this tenant's), their indexes first.
        doomed = await conn.fetch("SELECT id FROM vector.collections", timeout=timeout)
        for collection in doomed:
            await conn.execute("SELECT vector.drop_index($1)", collection["id"], timeout=timeout)
        await conn.execute("DELETE FROM vector.collections", timeout=timeout)
        return PurgedRows([(row["collection"], row["id"], row["version"]) for row in gone], len(doomed))

    async def audit(self, target: str, details: Mapping[str, Any]) -> None:
        await record_audit(self._conn, target, details, timeout=self._timeout)


class TenantStore:
    """The registry of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @asynccontextmanager
    async def transaction(
        self, tenant: str, *, timeout: float, read_only: bool = False
    ) -> AsyncIterator[RegistryTx]:
        """A tenant transaction of ``tenant`` (the slug), committed on clean exit."""
        async with self._db.tenant_transaction(tenant, timeout=timeout, read_only=read_only) as conn:
            yield RegistryTx(conn, timeout)

    async def find(self, by: str, name: str, *, timeout: float) -> TenantRow | None:
        """The tenant whose ``by`` ("id" or "slug") is ``name``."""
        assert by in _BY
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM tenants.tenants WHERE {by} = $1", name, timeout=timeout
        )
        return None if row is None else _tenant(row)

    async def list_tenants(
        self, status: int, after: str, limit: int, *, budget: int, timeout: float
    ) -> tuple[list[TenantRow], bool]:
        """Up to ``limit`` tenants of ``status`` (0: any) with slugs after ``after``, by slug, and
        whether they were cut where their metadata would pass ``budget`` bytes (shared.api.answers)."""
        listed = (
            f"SELECT {_COLUMNS}, octet_length(metadata::text) + octet_length(display_name) "
            f"+ octet_length(slug) + octet_length(plan) + {ROW_OVERHEAD_BYTES + 64} AS answer_bytes "
            "FROM tenants.tenants "
            "WHERE ($1 = 0 OR status = $1) AND slug > $2 ORDER BY slug LIMIT $3"
        )
        rows = await self._db.fetch(
            cut_by_bytes(listed, "slug", "$4"), status, after, limit, budget, timeout=timeout
        )
        fit, past = split_at_budget(rows, budget)
        return [_tenant(r) for r in fit], past is not None

    async def update(
        self,
        by: str,
        name: str,
        version: int | None,
        fields: Mapping[str, Any],
        *,
        details: Callable[[TenantRow], dict[str, Any]],
        timeout: float,
    ) -> TenantRow | None:
        """Set ``fields`` of the tenant whose ``by`` is ``name`` (at ``version``, if given), audited
        with ``details(row)``; None when no row matched (absent, or at another version)."""
        assert by in _BY
        names = list(fields)
        sets = ", ".join(
            f"{p} = ${i + 3}" + ("::jsonb" if p == "metadata" else "") for i, p in enumerate(names)
        )
        async with self._db.transaction(timeout=timeout) as conn:
            found = await conn.fetchrow(
                f"UPDATE tenants.tenants SET {sets}, version = version + 1, updated_at = now() "
                f"WHERE {by} = $1 AND ($2::bigint IS NULL OR version = $2) RETURNING {_COLUMNS}",
                name,
                version,
                *fields.values(),
                timeout=timeout,
            )
            row = None if found is None else _tenant(found)
            if row is not None:
                await record_audit(conn, f"tenant/{row.slug}", details(row), timeout=timeout)
        return row

    async def declare_index(self, collection: str, path: str, *, timeout: float) -> tuple[IndexRow, bool]:
        """The index on ``path`` of ``collection``, made (and audited) unless it was; whether it was made."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM tenants.declare_index($1, $2)", collection, path, timeout=timeout
            )
            assert row is not None
            if row["r_created"]:
                await record_audit(
                    conn, f"record_index/{collection}", {"path": path, "name": row["r_name"]}, timeout=timeout
                )
        return IndexRow(collection, path, row["r_name"], row["r_created_at"]), bool(row["r_created"])

    async def list_indexes(self, collection: str, *, timeout: float) -> list[IndexRow]:
        """The declared indexes of ``collection`` ("": of every collection), by collection and path."""
        rows = await self._db.fetch(
            "SELECT collection, path, name, created_at FROM tenants.record_indexes "
            "WHERE $1 = '' OR collection = $1 ORDER BY collection, path",
            collection,
            timeout=timeout,
        )
        return [IndexRow(r["collection"], r["path"], r["name"], r["created_at"]) for r in rows]


def _tenant(row: asyncpg.Record) -> TenantRow:
    return TenantRow(
        str(row["id"]),
        row["slug"],
        row["display_name"],
        row["status"],
        row["plan"],
        row["metadata"],
        row["version"],
        row["created_at"],
        row["updated_at"],
    )

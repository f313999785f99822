"""API keys in Postgres: every statement the admin service runs on admin.api_keys."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from strata.admin.v1 import admin_pb2

from shared.audit import record_audit
from shared.db import Database
from shared.timestamps import to_timestamp

__all__ = ["ApiKeyStore", "row_to_key"]

_COLUMNS = "key_id, tenant, name, scopes, created_at, revoked_at"


def row_to_key(row: asyncpg.Record) -> admin_pb2.ApiKey:
    """An ``ApiKey`` message from an admin.api_keys row."""
    return admin_pb2.ApiKey(
        key_id=row["key_id"],
        tenant=row["tenant"],
        name=row["name"],
        scopes=sorted(row["scopes"]),
        create_time=to_timestamp(row["created_at"]),
        revoke_time=to_timestamp(row["revoked_at"]),
    )


class ApiKeyStore:
    """The admin.api_keys table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(
        self,
        key_id: str,
        tenant: str,
        name: str,
        scopes: Sequence[str],
        secret_hash: bytes,
        *,
        timeout: float,
    ) -> asyncpg.Record:
        """Store a new key, audited; the row as stored."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO admin.api_keys (key_id, tenant, name, scopes, secret_hash) "
                f"VALUES ($1, $2, $3, $4, $5) RETURNING {_COLUMNS}",
                key_id,
                tenant,
                name,
                sorted(set(scopes)),
                secret_hash,
                timeout=timeout,
            )
            assert row is not None
            await record_audit(
                conn,
                f"api_key/{key_id}",
                {"tenant": tenant, "name": name, "scopes": row["scopes"]},
                timeout=timeout,
            )
        return row

    async def find_for_authentication(self, key_id: str, *, timeout: float) -> asyncpg.Record | None:
        """The live key ``key_id`` with its secret hash, its tenant's status and id (NULL: no tenant)."""
        return await self._db.fetchrow(
            "SELECT k.key_id, k.tenant, k.scopes, k.secret_hash, "
            "t.status AS tenant_status, t.id AS tenant_uid "
            "FROM admin.api_keys k LEFT JOIN tenants.tenants t ON t.slug = k.tenant "
            "WHERE k.key_id = $1 AND k.revoked_at IS NULL",
            key_id,
            timeout=timeout,
        )

    async def tenant_exists(self, tenant: str, *, timeout: float) -> bool:
        """Whether the registry knows ``tenant``."""
        return bool(
            await self._db.fetchval("SELECT 1 FROM tenants.tenants WHERE slug = $1", tenant, timeout=timeout)
        )

    async def page(
        self, tenant: str, include_revoked: bool, after: str, limit: int, *, timeout: float
    ) -> list[asyncpg.Record]:
        """Up to ``limit`` keys with key_id > ``after``, in key_id order."""
        return await self._db.fetch(
            f"SELECT {_COLUMNS} FROM admin.api_keys "
            "WHERE ($1 = '' OR tenant = $1) AND ($2 OR revoked_at IS NULL) AND key_id > $3 "
            "ORDER BY key_id LIMIT $4",
            tenant,
            include_revoked,
            after,
            limit,
            timeout=timeout,
        )

    async def revoke(self, key_id: str, tenant: str | None, *, timeout: float) -> asyncpg.Record | None:
        """Revoke ``key_id`` (keeping the first revocation time), audited; None if unknown, or
        not ``tenant``'s when one is given."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"UPDATE admin.api_keys SET revoked_at = coalesce(revoked_at, now()) "
                f"WHERE key_id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {_COLUMNS}",
                key_id,
                tenant,
                timeout=timeout,
            )
            if row is not None:
                await record_audit(conn, f"api_key/{key_id}", {"tenant": row["tenant"]}, timeout=timeout)
        return row

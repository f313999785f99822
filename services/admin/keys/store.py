"""API keys in Postgres: every statement the admin service runs on admin.api_keys, with typed rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from shared.storage.audit import record_audit
from shared.storage.db import Database

__all__ = ["ApiKeyRow", "ApiKeyStore", "KeyForAuthentication"]

_COLUMNS = "key_id, tenant, name, scopes, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """A key as callers see it (never its secret's hash)."""

    key_id: str
    tenant: str
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyForAuthentication:
    """A live key with what authenticating it needs: its secret's hash and its tenant's state."""

    key_id: str
    tenant: str
    scopes: list[str]
    secret_hash: bytes
    tenant_status: int | None  # strata.tenants.v1.TenantStatus; None: the tenant no longer exists
    tenant_uid: UUID | None


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
    ) -> ApiKeyRow:
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
        return ApiKeyRow(**row)

    async def find_for_authentication(self, key_id: str, *, timeout: float) -> KeyForAuthentication | None:
        """The live key ``key_id`` with its secret hash, its tenant's status and id; None if unknown or
        revoked."""
        row = await self._db.fetchrow(
            "SELECT k.key_id, k.tenant, k.scopes, k.secret_hash, "
            "t.status AS tenant_status, t.id AS tenant_uid "
            "FROM admin.api_keys k LEFT JOIN tenants.tenants t ON t.slug = k.tenant "
            "WHERE k.key_id = $1 AND k.revoked_at IS NULL",
            key_id,
            timeout=timeout,
        )
        return None if row is None else KeyForAuthentication(**row)

    async def tenant_exists(self, tenant: str, *, timeout: float) -> bool:
        """Whether the registry knows ``tenant``."""
        return bool(
            await self._db.fetchval("SELECT 1 FROM tenants.tenants WHERE slug = $1", tenant, timeout=timeout)
        )

    async def page(
        self, tenant: str, include_revoked: bool, after: str, limit: int, *, timeout: float
    ) -> list[ApiKeyRow]:
        """Up to ``limit`` keys with key_id > ``after``, in key_id order; every tenant's when ``tenant``
        is empty."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM admin.api_keys "
            "WHERE ($1 = '' OR tenant = $1) AND ($2 OR revoked_at IS NULL) AND key_id > $3 "
            "ORDER BY key_id LIMIT $4",
            tenant,
            include_revoked,
            after,
            limit,
            timeout=timeout,
        )
        return [ApiKeyRow(**row) for row in rows]

    async def revoke(self, key_id: str, tenant: str | None, *, timeout: float) -> ApiKeyRow | None:
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
        return None if row is None else ApiKeyRow(**row)

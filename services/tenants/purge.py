"""Everything a tenant owns, counted and removed when the tenant is deleted.

Records are deleted here (the tenants schema is ours), and so are vector
collections, in the same tenant transaction, since they are plain rows under
the same row-level security (their per-collection indexes are dropped by the
vector schema's own SECURITY DEFINER function). KV keys and API keys
belong to other services, so they are removed through those services' RPCs,
which keep their own promises (KV delete events and cache tombstones; key
revocation). Counting reads the other schemas directly: reads only.

Records and collections go in the caller's transaction, the one that deletes
(or creates) the tenant row, so they and the row change together. A tenant's
API key stays usable at the gateway for up to its key-cache time after
revocation, so a call may still write for that tenant after the purge; such
leftovers are unreachable (no key resolves to a tenant that does not exist)
and are purged when a tenant with the same slug is created again.
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg
import grpc
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from services.tenants.names import record_cache_key
from shared.cache import CacheEntry, RevisionedCache
from shared.db import Database
from shared.identity import INTERNAL_SCOPE, OPERATOR_SCOPE, Caller, signing_interceptors
from shared.settings import Settings, require_internal_secret
from shared.tls import internal_channel

__all__ = ["PurgedRows", "TenantPurge"]


class PurgedRows(NamedTuple):
    """What :meth:`TenantPurge.purge_rows` deleted."""

    records: list[tuple[str, str, int]]  # (collection, id, the tombstone's cache version)
    vector_collections: int


class TenantPurge:
    """Counts and removes a tenant's records, KV keys and API keys."""

    def __init__(self, db: Database, cache: RevisionedCache, settings: Settings) -> None:
        """Calls kv and admin at their first upstream address, as ``settings`` say."""
        self._db = db
        self._cache = cache
        secret = require_internal_secret(settings)
        # Each channel signs its calls for the request sent, with the one scope its calls need.
        self._kv = internal_channel(
            settings, settings.upstreams_of("kv")[0], interceptors=_signing(secret, INTERNAL_SCOPE)
        )
        self._admin = internal_channel(
            settings, settings.upstreams_of("admin")[0], interceptors=_signing(secret, OPERATOR_SCOPE)
        )

    async def close(self) -> None:
        await self._kv.close()
        await self._admin.close()

    async def count(self, conn: asyncpg.Connection, tenant: str, *, timeout: float) -> dict[str, int]:
        """What ``tenant`` still owns: records, kv_keys, api_keys (working ones), vector_collections.

        ``conn`` is in a tenant transaction of ``tenant`` (row-level security
        shows only its records and collections).
        """
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

    async def purge_services(self, tenant: str, *, timeout: float) -> dict[str, int]:
        """Revoke ``tenant``'s API keys and remove its KV keys, through admin and kv."""
        api_keys = await self._revoke_keys(tenant, timeout)
        kv = await kv_pb2_grpc.KvServiceStub(self._kv).PurgeTenant(
            kv_pb2.PurgeTenantRequest(tenant=tenant),
            timeout=timeout,
        )
        return {"api_keys": api_keys, "kv_keys": int(kv.deleted)}

    async def purge_rows(self, conn: asyncpg.Connection, *, timeout: float) -> PurgedRows:
        """Delete the records and vector collections that ``conn``'s tenant transaction shows.

        The caller commits, then passes the result to :meth:`forget`.
        """
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

    async def forget(self, tenant: str, purged: PurgedRows) -> None:
        """Tombstone the purged records, so no cache anywhere serves one (nor a late fill brings it back)."""
        await self._cache.record_writes(
            [
                (record_cache_key(tenant, collection, record_id), CacheEntry(version, None))
                for collection, record_id, version in purged.records
            ]
        )

    async def _revoke_keys(self, tenant: str, timeout: float) -> int:
        admin = admin_pb2_grpc.AdminServiceStub(self._admin)
        revoked = 0
        page_token = ""
        while True:
            page = await admin.ListApiKeys(
                admin_pb2.ListApiKeysRequest(tenant=tenant, page_size=1000, page_token=page_token),
                timeout=timeout,
            )
            for key in page.keys:
                await admin.RevokeApiKey(
                    admin_pb2.RevokeApiKeyRequest(key_id=key.key_id),
                    timeout=timeout,
                )
                revoked += 1
            if not page.next_page_token:
                return revoked
            page_token = page.next_page_token


def _signing(secret: bytes, scope: str) -> list[grpc.aio.ClientInterceptor]:
    return signing_interceptors(secret, Caller("strata-system", frozenset({scope}), "tenants-service"))

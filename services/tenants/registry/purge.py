"""What a tenant owns in other services, removed through their RPCs, and its purged records
tombstoned in the cache.

Records and vector collections are rows of this database, counted and
deleted by the registry's store in the transaction that deletes (or creates)
the tenant row, so they and the row change together
(:meth:`services.tenants.registry.store.RegistryTx.purge_rows`). KV keys and
API keys belong to other services, so they are removed through those
services' RPCs, which keep their own promises (KV delete events and cache
tombstones; key revocation).

A tenant's API key stays usable at the gateway for up to its key-cache time
after revocation, so a call may still write for that tenant after the purge;
such leftovers are unreachable (no key resolves to a tenant that does not
exist) and are purged when a tenant with the same slug is created again.
"""

from __future__ import annotations

import grpc
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.internal.v1 import internal_pb2, internal_pb2_grpc

from services.tenants.names import record_cache_key
from services.tenants.registry.store import PurgedRows
from shared.api.callers import INTERNAL_SCOPE, OPERATOR_SCOPE, Caller
from shared.cache.entries import CacheEntry
from shared.cache.revisioned import RevisionedCache
from shared.config.settings import Settings, require_internal_secret
from shared.rpc.identity import signing_interceptors
from shared.rpc.tls import internal_channel

__all__ = ["TenantPurge"]


class TenantPurge:
    """Removes a tenant's KV keys and API keys, and tombstones its purged records."""

    def __init__(self, cache: RevisionedCache, settings: Settings) -> None:
        """Calls kv and admin at their first upstream address, as ``settings`` say."""
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

    async def purge_services(self, tenant: str, *, timeout: float) -> dict[str, int]:
        """Revoke ``tenant``'s API keys and remove its KV keys, through admin and kv."""
        api_keys = await self._revoke_keys(tenant, timeout)
        kv = await internal_pb2_grpc.TenantPurgeServiceStub(self._kv).PurgeTenant(
            internal_pb2.PurgeTenantRequest(tenant=tenant),
            timeout=timeout,
        )
        return {"api_keys": api_keys, "kv_keys": int(kv.deleted)}

    async def forget(self, tenant: str, purged: PurgedRows) -> None:
        """Tombstone the purged records, so no cache anywhere serves one (nor a late fill brings it back)."""
        await self._cache.record_writes(
            [
                (record_cache_key(tenant, collection, record_id), CacheEntry(version, None))
                for collection, record_id, version in purged.records
            ]
        )

    async def _revoke_keys(self, tenant: str, timeout: float) -> int:
        admin = admin_pb2_grpc.ApiKeyServiceStub(self._admin)
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

"""``strata.tenants.v1.TenantService``: the tenant registry (operator scope).

Each RPC checks its request (:mod:`.checks`), runs its SQL through
:class:`TenantStore` and answers; creating a tenant over an earlier one's
leftovers, and deleting one with cascade, also go through
:class:`TenantPurge` (other services' RPCs, cache tombstones).
"""

from __future__ import annotations

import logging
from typing import Any

from strata.tenants.v1 import tenants_pb2

from services.tenants.names import COLLECTION_RE, TENANT_SLUG_RE
from services.tenants.registry.checks import (
    STATUSES,
    check_etag,
    check_fields,
    check_mask,
    name_of,
    raise_if,
    version_of,
)
from services.tenants.registry.mapping import index_message, tenant_message
from services.tenants.registry.purge import TenantPurge
from services.tenants.registry.store import PurgedRows, TenantRow, TenantStore
from shared.api.answers import answer_budget, page_rows
from shared.api.errors import (
    Code,
    FieldViolation,
    StrataError,
    aborted,
    already_exists,
    invalid_argument,
    not_found,
)
from shared.api.pagetoken import PageTokens, page_size
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout
from shared.storage.filters import validate_path

__all__ = ["TenantServicer"]

_log = logging.getLogger("strata.tenants")


class TenantServicer:
    """Serves TenantService from a :class:`TenantStore`; cascades through :class:`TenantPurge`."""

    def __init__(
        self, store: TenantStore, purge: TenantPurge, tokens: PageTokens, max_message_bytes: int
    ) -> None:
        """``max_message_bytes``: the largest answer sent (STRATA_MAX_MESSAGE_BYTES)."""
        self._store = store
        self._tokens = tokens
        self._max_message_bytes = max_message_bytes
        self._purge = purge

    async def CreateTenant(
        self, request: tenants_pb2.CreateTenantRequest, context: Context
    ) -> tenants_pb2.CreateTenantResponse:
        tenant = request.tenant
        errors: list[FieldViolation] = []
        if not TENANT_SLUG_RE.fullmatch(tenant.slug):
            errors.append(
                FieldViolation(
                    "tenant.slug", "must be 1-63 characters of [a-z0-9-], starting with a letter or digit"
                )
            )
        metadata = check_fields(tenant, "tenant.", errors)
        raise_if(errors)
        timeout = deadline_timeout(context)
        purged = PurgedRows([], 0)
        async with self._store.transaction(tenant.slug, timeout=timeout) as tx:
            row = await tx.insert_tenant(
                tenant.slug,
                tenant.display_name,
                tenant.status or tenants_pb2.TENANT_STATUS_ACTIVE,
                tenant.plan,
                metadata,
            )
            if row is None:
                raise already_exists(
                    "TENANT_ALREADY_EXISTS", f"tenant {tenant.slug!r} exists", slug=tenant.slug
                )
            # Data an earlier tenant of this slug was sent after its delete: never the new one's.
            leftovers = await tx.owned(tenant.slug)
            left_over = any(leftovers.values())
            if left_over:
                purged = await tx.purge_rows()
                await self._purge.purge_services(tenant.slug, timeout=timeout)
                _log.warning(
                    "removed what an earlier tenant of this slug left",
                    extra={"tenant": tenant.slug, **leftovers},
                )
            details: dict[str, Any] = {"status": row.status, "plan": row.plan}
            if left_over:
                details["leftovers_removed"] = leftovers
            await tx.audit(f"tenant/{tenant.slug}", details)
        await self._purge.forget(tenant.slug, purged)
        return tenants_pb2.CreateTenantResponse(tenant=tenant_message(row))

    async def GetTenant(
        self, request: tenants_pb2.GetTenantRequest, context: Context
    ) -> tenants_pb2.GetTenantResponse:
        row = await self._find(request, context)
        return tenants_pb2.GetTenantResponse(tenant=tenant_message(row))

    async def ListTenants(
        self, request: tenants_pb2.ListTenantsRequest, context: Context
    ) -> tenants_pb2.ListTenantsResponse:
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        if request.status not in STATUSES:
            errors.append(FieldViolation("status", "is not a TenantStatus"))
        raise_if(errors)
        query = ["tenants.ListTenants", request.status]
        after = self._tokens.cursor(request.page_token, query, "")
        budget = answer_budget(self._max_message_bytes)
        rows, cut = await self._store.list_tenants(
            request.status, str(after), size + 1, budget=budget, timeout=deadline_timeout(context)
        )
        kept, more = page_rows(rows, cut, size, budget=budget, item="tenant")
        response = tenants_pb2.ListTenantsResponse(tenants=[tenant_message(r) for r in kept])
        if more:
            response.next_page_token = self._tokens.encode(query, kept[-1].slug)
        return response

    async def UpdateTenant(
        self, request: tenants_pb2.UpdateTenantRequest, context: Context
    ) -> tenants_pb2.UpdateTenantResponse:
        errors: list[FieldViolation] = []
        paths = check_mask(request, errors)
        metadata = check_fields(request.tenant, "tenant.", errors)
        raise_if(errors)
        by, name = name_of(request.tenant.id, request.tenant.slug)
        values = {
            "display_name": request.tenant.display_name,
            "status": request.tenant.status,
            "plan": request.tenant.plan,
            "metadata": metadata,
        }
        timeout = deadline_timeout(context)
        row = await self._store.update(
            by,
            name,
            version_of(request.tenant.etag, "tenant.etag"),
            {p: values[p] for p in paths},
            details=lambda r: {"fields": paths, "status": r.status, "version": r.version},
            timeout=timeout,
        )
        if row is None:
            await self._find_by(by, name, timeout)  # NOT_FOUND if absent
            raise aborted("ETAG_MISMATCH", "the tenant changed since that etag")
        return tenants_pb2.UpdateTenantResponse(tenant=tenant_message(row))

    async def DeleteTenant(
        self, request: tenants_pb2.DeleteTenantRequest, context: Context
    ) -> tenants_pb2.DeleteTenantResponse:
        row = await self._find(request, context)
        check_etag(request.etag, row)
        slug = row.slug
        timeout = deadline_timeout(context)
        async with self._store.transaction(slug, timeout=timeout, read_only=True) as tx:
            remaining = await tx.owned(slug)
        if any(remaining.values()) and not request.cascade:
            raise _not_empty(remaining)
        # Keys and KV first (other services, RPCs), then, in one transaction
        # holding the tenant row, its records, collections and the row itself.
        elsewhere = (
            await self._purge.purge_services(slug, timeout=timeout)
            if request.cascade
            else {"api_keys": 0, "kv_keys": 0}
        )
        async with self._store.transaction(slug, timeout=timeout) as tx:
            locked = await tx.lock(row.id)
            if locked is None:
                raise not_found("TENANT_NOT_FOUND", "no such tenant", slug=slug)
            check_etag(request.etag, locked)
            if not request.cascade:
                # Anything written since the first count is still refused, not deleted.
                remaining = await tx.owned(slug)
                if any(remaining.values()):
                    raise _not_empty(remaining)
            purged = await tx.purge_rows()
            await tx.delete_tenant(row.id)
            removed = {
                "records": len(purged.records),
                "vector_collections": purged.vector_collections,
                **elsewhere,
            }
            await tx.audit(f"tenant/{slug}", {"cascade": request.cascade, **removed})
        await self._purge.forget(slug, purged)
        return tenants_pb2.DeleteTenantResponse(
            records_deleted=removed["records"],
            kv_keys_deleted=removed["kv_keys"],
            api_keys_deleted=removed["api_keys"],
            vector_collections_deleted=removed["vector_collections"],
        )

    async def DeclareIndex(
        self, request: tenants_pb2.DeclareIndexRequest, context: Context
    ) -> tenants_pb2.DeclareIndexResponse:
        errors: list[FieldViolation] = []
        if not COLLECTION_RE.fullmatch(request.index.collection):
            errors.append(FieldViolation("index.collection", "must be 1-64 characters of [A-Za-z0-9_-]"))
        validate_path(request.index.path, "index.path", errors)
        raise_if(errors)
        index, created = await self._store.declare_index(
            request.index.collection, request.index.path, timeout=max(deadline_timeout(context), 5.0)
        )
        return tenants_pb2.DeclareIndexResponse(index=index_message(index), created=created)

    async def ListIndexes(
        self, request: tenants_pb2.ListIndexesRequest, context: Context
    ) -> tenants_pb2.ListIndexesResponse:
        rows = await self._store.list_indexes(request.collection, timeout=deadline_timeout(context))
        return tenants_pb2.ListIndexesResponse(indexes=[index_message(r) for r in rows])

    async def _find(
        self, request: tenants_pb2.GetTenantRequest | tenants_pb2.DeleteTenantRequest, context: Context
    ) -> TenantRow:
        which = request.WhichOneof("name")
        if which is None:
            raise invalid_argument([FieldViolation("id", "set id or slug")])
        by, name = name_of(request.id if which == "id" else "", request.slug if which == "slug" else "")
        return await self._find_by(by, name, deadline_timeout(context))

    async def _find_by(self, by: str, name: str, timeout: float) -> TenantRow:
        row = await self._store.find(by, name, timeout=timeout)
        if row is None:
            raise not_found("TENANT_NOT_FOUND", "no such tenant", **{by: name})
        return row


def _not_empty(remaining: dict[str, int]) -> StrataError:
    """FAILED_PRECONDITION naming what the tenant still owns (kinds with none left out of the message)."""
    owned = ", ".join(f"{kind.replace('_', ' ')}: {count}" for kind, count in remaining.items() if count)
    return StrataError(
        Code.FAILED_PRECONDITION,
        "TENANT_NOT_EMPTY",
        f"the tenant still owns {owned}; delete them first or set cascade",
        metadata={kind: str(count) for kind, count in remaining.items()},
    )

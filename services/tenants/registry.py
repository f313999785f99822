"""``strata.tenants.v1.TenantService``: the tenant registry (admin scope)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import struct_pb2
from strata.tenants.v1 import tenants_pb2

from services.tenants.names import COLLECTION_RE, DOMAIN, TENANT_SLUG_RE
from services.tenants.purge import PurgedRows, TenantPurge
from shared.audit import record_audit
from shared.db import Database, deadline_timeout
from shared.documents import document_json
from shared.errors import FieldViolation, StrataError, aborted, already_exists, invalid_argument, not_found
from shared.filters import validate_path
from shared.identity import OPERATOR_SCOPE, require_scope
from shared.pagetoken import encode_page_token, page_cursor, page_size
from shared.timestamps import to_timestamp

__all__ = ["TenantServicer"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_log = logging.getLogger("strata.tenants")
_MUTABLE = ("display_name", "status", "plan", "metadata")
_MAX_METADATA = 64 * 1024
_STATUSES = (0, tenants_pb2.TENANT_STATUS_ACTIVE, tenants_pb2.TENANT_STATUS_SUSPENDED)  # 0: unset
_COLUMNS = "id, slug, display_name, status, plan, metadata, version, created_at, updated_at"


def row_to_tenant(row: asyncpg.Record) -> tenants_pb2.Tenant:
    """A ``Tenant`` from a tenants.tenants row."""
    metadata = struct_pb2.Struct()
    metadata.update(json.loads(row["metadata"]))
    return tenants_pb2.Tenant(
        id=str(row["id"]),
        slug=row["slug"],
        display_name=row["display_name"],
        status=row["status"],
        plan=row["plan"],
        metadata=metadata,
        etag=f"v{row['version']}",
        create_time=to_timestamp(row["created_at"]),
        update_time=to_timestamp(row["updated_at"]),
    )


class TenantServicer:
    """Serves TenantService from tenants.tenants; cascades through :class:`TenantPurge`."""

    def __init__(self, db: Database, purge: TenantPurge) -> None:
        self._db = db
        self._purge = purge

    async def CreateTenant(
        self, request: tenants_pb2.CreateTenantRequest, context: Context
    ) -> tenants_pb2.CreateTenantResponse:
        require_scope(OPERATOR_SCOPE)
        tenant = request.tenant
        errors: list[FieldViolation] = []
        if not TENANT_SLUG_RE.fullmatch(tenant.slug):
            errors.append(
                FieldViolation(
                    "tenant.slug", "must be 1-63 characters of [a-z0-9-], starting with a letter or digit"
                )
            )
        metadata = _check_fields(tenant, "tenant.", errors)
        if errors:
            raise invalid_argument(errors, domain=DOMAIN)
        timeout = deadline_timeout(context)
        purged = PurgedRows([], 0)
        # The slug's unique index orders this against a concurrent create or
        # delete of the same slug: the insert waits for the other to commit.
        async with self._db.tenant_transaction(tenant.slug, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO tenants.tenants (slug, display_name, status, plan, metadata) "
                f"VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (slug) DO NOTHING RETURNING {_COLUMNS}",
                tenant.slug,
                tenant.display_name,
                tenant.status or tenants_pb2.TENANT_STATUS_ACTIVE,
                tenant.plan,
                metadata,
                timeout=timeout,
            )
            if row is None:
                raise already_exists(
                    "TENANT_ALREADY_EXISTS", f"tenant {tenant.slug!r} exists", domain=DOMAIN, slug=tenant.slug
                )
            # Data an earlier tenant of this slug was sent after its delete: never the new one's.
            leftovers = await self._purge.count(conn, tenant.slug, timeout=timeout)
            left_over = any(leftovers.values())
            if left_over:
                purged = await self._purge.purge_rows(conn, timeout=timeout)
                await self._purge.purge_services(tenant.slug, timeout=timeout)
                _log.warning(
                    "removed what an earlier tenant of this slug left",
                    extra={"tenant": tenant.slug, **leftovers},
                )
            details = {"status": row["status"], "plan": row["plan"]}
            if left_over:
                details["leftovers_removed"] = leftovers
            await record_audit(conn, f"tenant/{tenant.slug}", details, timeout=timeout)
        await self._purge.forget(tenant.slug, purged)
        return tenants_pb2.CreateTenantResponse(tenant=row_to_tenant(row))

    async def GetTenant(
        self, request: tenants_pb2.GetTenantRequest, context: Context
    ) -> tenants_pb2.GetTenantResponse:
        require_scope(OPERATOR_SCOPE)
        row = await self._find(request, context)
        return tenants_pb2.GetTenantResponse(tenant=row_to_tenant(row))

    async def ListTenants(
        self, request: tenants_pb2.ListTenantsRequest, context: Context
    ) -> tenants_pb2.ListTenantsResponse:
        require_scope(OPERATOR_SCOPE)
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        if request.status not in _STATUSES:
            errors.append(FieldViolation("status", "is not a TenantStatus"))
        if errors:
            raise invalid_argument(errors, domain=DOMAIN)
        query = ["tenants.ListTenants", request.status]
        after = page_cursor(request.page_token, query, "", domain=DOMAIN)
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM tenants.tenants WHERE ($1 = 0 OR status = $1) AND slug > $2 "
            "ORDER BY slug LIMIT $3",
            request.status,
            str(after),
            size + 1,
            timeout=deadline_timeout(context),
        )
        response = tenants_pb2.ListTenantsResponse(tenants=[row_to_tenant(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = encode_page_token(query, rows[size - 1]["slug"])
        return response

    async def UpdateTenant(
        self, request: tenants_pb2.UpdateTenantRequest, context: Context
    ) -> tenants_pb2.UpdateTenantResponse:
        require_scope(OPERATOR_SCOPE)
        errors: list[FieldViolation] = []
        paths = list(request.update_mask.paths)
        if not paths:
            errors.append(FieldViolation("update_mask", f"name the fields to change: {', '.join(_MUTABLE)}"))
        for i, path in enumerate(paths):
            if path not in _MUTABLE:
                errors.append(
                    FieldViolation(f"update_mask.paths[{i}]", f"must be one of {', '.join(_MUTABLE)}")
                )
            elif path in paths[:i]:
                errors.append(FieldViolation(f"update_mask.paths[{i}]", "names a field named before"))
        if "status" in paths and request.tenant.status == tenants_pb2.TENANT_STATUS_UNSPECIFIED:
            errors.append(FieldViolation("tenant.status", "must be ACTIVE or SUSPENDED"))
        metadata = _check_fields(request.tenant, "tenant.", errors)
        if errors:
            raise invalid_argument(errors, domain=DOMAIN)
        by, name = _name_of(request.tenant.id, request.tenant.slug)
        sets = ", ".join(
            f"{p} = ${i + 3}" + ("::jsonb" if p == "metadata" else "") for i, p in enumerate(paths)
        )
        values = {
            "display_name": request.tenant.display_name,
            "status": request.tenant.status,
            "plan": request.tenant.plan,
            "metadata": metadata,
        }
        version = _version_of(request.etag)
        row = await self._write_audited(
            f"UPDATE tenants.tenants SET {sets}, version = version + 1, updated_at = now() "
            f"WHERE {by} = $1 AND ($2::bigint IS NULL OR version = $2) RETURNING {_COLUMNS}",
            name,
            version,
            *(values[p] for p in paths),
            timeout=deadline_timeout(context),
            details=lambda r: {"fields": paths, "status": r["status"], "version": r["version"]},
        )
        if row is None:
            await self._find_by(by, name, context)  # NOT_FOUND if absent
            raise aborted("ETAG_MISMATCH", "the tenant changed since that etag", domain=DOMAIN)
        return tenants_pb2.UpdateTenantResponse(tenant=row_to_tenant(row))

    async def DeleteTenant(
        self, request: tenants_pb2.DeleteTenantRequest, context: Context
    ) -> tenants_pb2.DeleteTenantResponse:
        require_scope(OPERATOR_SCOPE)
        row = await self._find(request, context)
        _check_etag(request.etag, row)
        slug = row["slug"]
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(slug, timeout=timeout, read_only=True) as conn:
            remaining = await self._purge.count(conn, slug, timeout=timeout)
        if any(remaining.values()) and not request.cascade:
            raise _not_empty(remaining)
        # Keys and KV first (other services, RPCs), then, in one transaction
        # holding the tenant row, its records, collections and the row itself.
        elsewhere = (
            await self._purge.purge_services(slug, timeout=timeout)
            if request.cascade
            else {"api_keys": 0, "kv_keys": 0}
        )
        async with self._db.tenant_transaction(slug, timeout=timeout) as conn:
            locked = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM tenants.tenants WHERE id = $1 FOR UPDATE", row["id"], timeout=timeout
            )
            if locked is None:
                raise not_found("TENANT_NOT_FOUND", "no such tenant", domain=DOMAIN, slug=slug)
            _check_etag(request.etag, locked)
            if not request.cascade:
                # Anything written since the first count is still refused, not deleted.
                remaining = await self._purge.count(conn, slug, timeout=timeout)
                if any(remaining.values()):
                    raise _not_empty(remaining)
            purged = await self._purge.purge_rows(conn, timeout=timeout)
            await conn.execute("DELETE FROM tenants.tenants WHERE id = $1", row["id"], timeout=timeout)
            removed = {
                "records": len(purged.records),
                "vector_collections": purged.vector_collections,
                **elsewhere,
            }
            details = {"cascade": request.cascade, **removed}
            await record_audit(conn, f"tenant/{slug}", details, timeout=timeout)
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
        require_scope(OPERATOR_SCOPE)
        errors: list[FieldViolation] = []
        if not COLLECTION_RE.fullmatch(request.index.collection):
            errors.append(FieldViolation("index.collection", "must be 1-64 characters of [A-Za-z0-9_-]"))
        validate_path(request.index.path, "index.path", errors)
        if errors:
            raise invalid_argument(errors, domain=DOMAIN)
        timeout = max(deadline_timeout(context), 5.0)
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM tenants.declare_index($1, $2)",
                request.index.collection,
                request.index.path,
                timeout=timeout,
            )
            assert row is not None
            if row["r_created"]:
                await record_audit(
                    conn,
                    f"record_index/{request.index.collection}",
                    {"path": request.index.path, "name": row["r_name"]},
                    timeout=timeout,
                )
        index = tenants_pb2.RecordIndex(
            collection=request.index.collection,
            path=request.index.path,
            name=row["r_name"],
            create_time=to_timestamp(row["r_created_at"]),
        )
        return tenants_pb2.DeclareIndexResponse(index=index, created=row["r_created"])

    async def ListIndexes(
        self, request: tenants_pb2.ListIndexesRequest, context: Context
    ) -> tenants_pb2.ListIndexesResponse:
        require_scope(OPERATOR_SCOPE)
        rows = await self._db.fetch(
            "SELECT collection, path, name, created_at FROM tenants.record_indexes "
            "WHERE $1 = '' OR collection = $1 ORDER BY collection, path",
            request.collection,
            timeout=deadline_timeout(context),
        )
        return tenants_pb2.ListIndexesResponse(
            indexes=[
                tenants_pb2.RecordIndex(
                    collection=r["collection"],
                    path=r["path"],
                    name=r["name"],
                    create_time=to_timestamp(r["created_at"]),
                )
                for r in rows
            ]
        )

    async def _write_audited(
        self,
        sql: str,
        *args: Any,
        timeout: float,
        details: Callable[[asyncpg.Record], dict[str, Any]],
    ) -> asyncpg.Record | None:
        """Run one tenant write returning ``slug``; when it hits a row, audit it in the same transaction."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(sql, *args, timeout=timeout)
            if row is not None:
                await record_audit(conn, f"tenant/{row['slug']}", details(row), timeout=timeout)
        return row

    async def _find(
        self, request: tenants_pb2.GetTenantRequest | tenants_pb2.DeleteTenantRequest, context: Context
    ) -> asyncpg.Record:
        which = request.WhichOneof("name")
        if which is None:
            raise invalid_argument([FieldViolation("id", "set id or slug")], domain=DOMAIN)
        by, name = _name_of(request.id if which == "id" else "", request.slug if which == "slug" else "")
        return await self._find_by(by, name, context)

    async def _find_by(self, by: str, name: str, context: Context) -> asyncpg.Record:
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM tenants.tenants WHERE {by} = $1", name, timeout=deadline_timeout(context)
        )
        if row is None:
            raise not_found("TENANT_NOT_FOUND", "no such tenant", domain=DOMAIN, **{by: name})
        return row


def _name_of(tenant_id: str, slug: str) -> tuple[str, Any]:
    """("id", UUID) or ("slug", slug); INVALID_ARGUMENT for neither or a malformed one."""
    if tenant_id:
        try:
            return "id", str(uuid.UUID(tenant_id))
        except ValueError:
            raise invalid_argument([FieldViolation("id", "is not a UUID")], domain=DOMAIN) from None
    if TENANT_SLUG_RE.fullmatch(slug):
        return "slug", slug
    raise invalid_argument([FieldViolation("slug", "set a tenant id or a valid slug")], domain=DOMAIN)


def _check_etag(etag: str, row: asyncpg.Record) -> None:
    """ABORTED when ``etag`` is set and is not the tenant row's."""
    if etag and etag != f"v{row['version']}":
        raise aborted("ETAG_MISMATCH", "the tenant changed since that etag", domain=DOMAIN)


def _not_empty(remaining: dict[str, int]) -> StrataError:
    """FAILED_PRECONDITION naming what the tenant still owns (kinds with none left out of the message)."""
    owned = ", ".join(f"{kind.replace('_', ' ')}: {count}" for kind, count in remaining.items() if count)
    return StrataError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "TENANT_NOT_EMPTY",
        f"the tenant still owns {owned}; delete them first or set cascade",
        domain=DOMAIN,
        metadata={kind: str(count) for kind, count in remaining.items()},
    )


def _version_of(etag: str) -> int | None:
    if not etag:
        return None
    if not (etag.startswith("v") and etag[1:].isdigit()):
        raise invalid_argument([FieldViolation("etag", "is not an etag of this API")], domain=DOMAIN)
    return int(etag[1:])


def _check_fields(tenant: tenants_pb2.Tenant, prefix: str, errors: list[FieldViolation]) -> str:
    """Validate the mutable fields; the metadata as JSON text."""
    if len(tenant.display_name) > 200:
        errors.append(FieldViolation(f"{prefix}display_name", "must be at most 200 characters"))
    if len(tenant.plan) > 64:
        errors.append(FieldViolation(f"{prefix}plan", "must be at most 64 characters"))
    if tenant.status not in _STATUSES:
        errors.append(FieldViolation(f"{prefix}status", "is not a TenantStatus"))
    return document_json(tenant.metadata, f"{prefix}metadata", errors, max_bytes=_MAX_METADATA)

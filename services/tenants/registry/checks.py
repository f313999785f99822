"""What TenantService checks of a request: a tenant's name, its mutable fields, etags, update masks."""

from __future__ import annotations

import uuid
from typing import Any

from strata.tenants.v1 import tenants_pb2

from services.tenants.names import TENANT_SLUG_RE
from services.tenants.registry.mapping import tenant_etag
from services.tenants.registry.store import TenantRow
from shared.api.documents import document_json
from shared.api.errors import FieldViolation, aborted, invalid_argument, raise_invalid

__all__ = [
    "MUTABLE",
    "STATUSES",
    "check_etag",
    "check_fields",
    "check_mask",
    "name_of",
    "raise_if",
    "version_of",
]

MUTABLE = ("display_name", "status", "plan", "metadata")
STATUSES = (0, tenants_pb2.TENANT_STATUS_ACTIVE, tenants_pb2.TENANT_STATUS_SUSPENDED)  # 0: unset
_MAX_METADATA = 64 * 1024


def raise_if(errors: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT with ``errors``, if there are any."""
    raise_invalid(errors)


def name_of(tenant_id: str, slug: str) -> tuple[str, Any]:
    """("id", UUID) or ("slug", slug); INVALID_ARGUMENT for neither or a malformed one."""
    if tenant_id:
        try:
            return "id", str(uuid.UUID(tenant_id))
        except ValueError:
            raise invalid_argument([FieldViolation("id", "is not a UUID")]) from None
    if TENANT_SLUG_RE.fullmatch(slug):
        return "slug", slug
    raise invalid_argument([FieldViolation("slug", "set a tenant id or a valid slug")])


def check_fields(tenant: tenants_pb2.Tenant, prefix: str, errors: list[FieldViolation]) -> str:
    """Validate the mutable fields; the metadata as JSON text."""
    if len(tenant.display_name) > 200:
        errors.append(FieldViolation(f"{prefix}display_name", "must be at most 200 characters"))
    if len(tenant.plan) > 64:
        errors.append(FieldViolation(f"{prefix}plan", "must be at most 64 characters"))
    if tenant.status not in STATUSES:
        errors.append(FieldViolation(f"{prefix}status", "is not a TenantStatus"))
    return document_json(tenant.metadata, f"{prefix}metadata", errors, max_bytes=_MAX_METADATA)


def check_mask(request: tenants_pb2.UpdateTenantRequest, errors: list[FieldViolation]) -> list[str]:
    """The fields UpdateTenant is to change: named, each once, among :data:`MUTABLE`; without a mask,
    those the request sets (AIP-134's implied mask)."""
    paths = list(request.update_mask.paths) or _set_fields(request.tenant)
    if not paths:
        errors.append(
            FieldViolation(
                "update_mask", f"names no field and the tenant sets none; one of {', '.join(MUTABLE)}"
            )
        )
    for i, path in enumerate(paths):
        if path not in MUTABLE:
            errors.append(FieldViolation(f"update_mask.paths[{i}]", f"must be one of {', '.join(MUTABLE)}"))
        elif path in paths[:i]:
            errors.append(FieldViolation(f"update_mask.paths[{i}]", "names a field named before"))
    if "status" in paths and request.tenant.status == tenants_pb2.TENANT_STATUS_UNSPECIFIED:
        errors.append(FieldViolation("tenant.status", "must be ACTIVE or SUSPENDED"))
    return paths


def _set_fields(tenant: tenants_pb2.Tenant) -> list[str]:
    """The mutable fields ``tenant`` sets: a non-empty string, a status, metadata present."""
    set_fields = {
        "display_name": bool(tenant.display_name),
        "status": tenant.status != tenants_pb2.TENANT_STATUS_UNSPECIFIED,
        "plan": bool(tenant.plan),
        "metadata": tenant.HasField("metadata"),
    }
    return [name for name in MUTABLE if set_fields[name]]


def check_etag(etag: str, row: TenantRow) -> None:
    """ABORTED when ``etag`` is set and is not the tenant row's."""
    if etag and etag != tenant_etag(row):
        raise aborted("ETAG_MISMATCH", "the tenant changed since that etag")


def version_of(etag: str, field: str) -> int | None:
    """The version ``etag`` names; None without one; INVALID_ARGUMENT on ``field`` for one not of
    this API."""
    if not etag:
        return None
    if not (etag.startswith("v") and etag[1:].isdigit()):
        raise invalid_argument([FieldViolation(field, "is not an etag of this API")])
    return int(etag[1:])

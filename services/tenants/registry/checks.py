"""What TenantService checks of a request: a tenant's name, its mutable fields, etags, update masks."""

from __future__ import annotations

import uuid
from typing import Any

from strata.tenants.v1 import tenants_pb2

from services.tenants.names import DOMAIN, TENANT_SLUG_RE
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
    raise_invalid(errors, domain=DOMAIN)


def name_of(tenant_id: str, slug: str) -> tuple[str, Any]:
    """("id", UUID) or ("slug", slug); INVALID_ARGUMENT for neither or a malformed one."""
    if tenant_id:
        try:
            return "id", str(uuid.UUID(tenant_id))
        except ValueError:
            raise invalid_argument([FieldViolation("id", "is not a UUID")], domain=DOMAIN) from None
    if TENANT_SLUG_RE.fullmatch(slug):
        return "slug", slug
    raise invalid_argument([FieldViolation("slug", "set a tenant id or a valid slug")], domain=DOMAIN)


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
    """The fields UpdateTenant is to change: named, each once, among :data:`MUTABLE`."""
    paths = list(request.update_mask.paths)
    if not paths:
        errors.append(FieldViolation("update_mask", f"name the fields to change: {', '.join(MUTABLE)}"))
    for i, path in enumerate(paths):
        if path not in MUTABLE:
            errors.append(FieldViolation(f"update_mask.paths[{i}]", f"must be one of {', '.join(MUTABLE)}"))
        elif path in paths[:i]:
            errors.append(FieldViolation(f"update_mask.paths[{i}]", "names a field named before"))
    if "status" in paths and request.tenant.status == tenants_pb2.TENANT_STATUS_UNSPECIFIED:
        errors.append(FieldViolation("tenant.status", "must be ACTIVE or SUSPENDED"))
    return paths


def check_etag(etag: str, row: TenantRow) -> None:
    """ABORTED when ``etag`` is set and is not the tenant row's."""
    if etag and etag != tenant_etag(row):
        raise aborted("ETAG_MISMATCH", "the tenant changed since that etag", domain=DOMAIN)


def version_of(etag: str) -> int | None:
    """The version ``etag`` names; None without one; INVALID_ARGUMENT for one not of this API."""
    if not etag:
        return None
    if not (etag.startswith("v") and etag[1:].isdigit()):
        raise invalid_argument([FieldViolation("etag", "is not an etag of this API")], domain=DOMAIN)
    return int(etag[1:])

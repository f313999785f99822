"""Registry rows as messages."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2
from strata.tenants.v1 import tenants_pb2

from services.tenants.registry.store import IndexRow, TenantRow
from shared.api.timestamps import to_timestamp

__all__ = ["index_message", "tenant_etag", "tenant_message"]


def tenant_etag(row: TenantRow) -> str:
    """The etag of a tenant row: ``v<version>``."""
    return f"v{row.version}"


def tenant_message(row: TenantRow) -> tenants_pb2.Tenant:
    """A ``Tenant`` from a tenants.tenants row."""
    metadata = struct_pb2.Struct()
    metadata.update(json.loads(row.metadata))
    return tenants_pb2.Tenant(
        id=row.id,
        slug=row.slug,
        display_name=row.display_name,
        status=tenants_pb2.TenantStatus.Name(row.status),
        plan=row.plan,
        metadata=metadata,
        etag=tenant_etag(row),
        create_time=to_timestamp(row.created_at),
        update_time=to_timestamp(row.updated_at),
    )


def index_message(row: IndexRow) -> tenants_pb2.RecordIndex:
    return tenants_pb2.RecordIndex(
        collection=row.collection, path=row.path, name=row.name, create_time=to_timestamp(row.created_at)
    )

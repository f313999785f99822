"""API key rows as ``strata.admin.v1`` messages."""

from __future__ import annotations

from strata.admin.v1 import admin_pb2

from services.admin.keys.store import ApiKeyRow
from shared.api.timestamps import to_timestamp

__all__ = ["key_message"]


def key_message(row: ApiKeyRow) -> admin_pb2.ApiKey:
    """An ``ApiKey`` message from a stored key."""
    return admin_pb2.ApiKey(
        key_id=row.key_id,
        tenant=row.tenant,
        name=row.name,
        scopes=sorted(row.scopes),
        create_time=to_timestamp(row.created_at),
        revoke_time=to_timestamp(row.revoked_at),
    )

"""Registry rows as ``strata.admin.v1`` messages."""

from __future__ import annotations

from strata.admin.v1 import admin_pb2

from services.admin.branches.registry import BranchRow
from shared.api.timestamps import to_timestamp

__all__ = ["branch_message"]


def branch_message(row: BranchRow) -> admin_pb2.Branch:
    """A registry row as a Branch (a point-in-time branch's server fields are filled by its owner)."""
    return admin_pb2.Branch(
        name=row.name,
        origin=row.origin,
        create_time=to_timestamp(row.created_at),
        bytes=row.bytes,
        as_of=to_timestamp(row.as_of),
    )

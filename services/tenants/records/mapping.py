"""Record rows as messages and as cache entries."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2
from strata.tenants.v1 import tenants_pb2

from services.tenants.records.store import RecordRow
from shared.api.timestamps import to_timestamp
from shared.cache.entries import CacheEntry

__all__ = ["cache_entry", "record_etag", "record_message"]


def record_etag(row: RecordRow) -> str:
    """The etag of a record row: ``r<revision>-<cache_version>``, opaque to callers.

    ``revision`` alone restarts at 1 when a record is deleted and re-created,
    so a deleted record's etag would fit its successor; ``cache_version`` is
    drawn from a sequence by every write, so the pair names one state of one
    incarnation and is never issued twice.
    """
    return f"r{row.revision}-{row.cache_version}"


def record_message(row: RecordRow) -> tenants_pb2.Record:
    """A ``Record`` from a tenants.records row."""
    data = struct_pb2.Struct()
    data.update(json.loads(row.data))
    return tenants_pb2.Record(
        collection=row.collection,
        id=row.id,
        data=data,
        revision=row.revision,
        etag=record_etag(row),
        create_time=to_timestamp(row.created_at),
        update_time=to_timestamp(row.updated_at),
    )


def cache_entry(row: RecordRow) -> CacheEntry:
    """A record row as a cache entry, guarded by its cache_version."""
    return CacheEntry(row.cache_version, record_message(row).SerializeToString())

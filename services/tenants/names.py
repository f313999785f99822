"""Names in the tenants service: the shapes of slugs and collections, cache keys."""

from __future__ import annotations

import re

__all__ = ["COLLECTION_RE", "TENANT_SLUG_RE", "record_cache_key"]

TENANT_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
COLLECTION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def record_cache_key(tenant: str, collection: str, record_id: str) -> bytes:
    """The cache key of one record (none of the parts can hold NUL)."""
    return f"{tenant}\x00{collection}\x00{record_id}".encode()

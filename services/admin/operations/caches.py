"""GetCacheStats and InvalidateCache: every process's published cache figures, and dropping entries."""

from __future__ import annotations

import re

from redis.exceptions import RedisError
from strata.admin.v1 import admin_pb2

from services.admin.operations.figures import process_stats
from shared.api.errors import FieldViolation, invalid_argument, unavailable
from shared.cache.invalidations import invalidate_prefix
from shared.cache.redisclient import Redis
from shared.observability.stats import read_process_stats
from shared.storage.audit import record_audit
from shared.storage.db import Database

__all__ = ["CacheControl"]

# InvalidateCache's service name → the cache's name (its Redis keys and channel).
_CACHES = {"kv": "kv", "tenants": "records"}
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class CacheControl:
    """The caches of every process: their published figures, and invalidation through Redis."""

    def __init__(self, db: Database, redis: Redis) -> None:
        self._db = db
        self._redis = redis

    async def cache_stats(self) -> admin_pb2.GetCacheStatsResponse:
        """The published figures of every process that has a cache."""
        try:
            snapshots = await read_process_stats(self._redis)
        except (RedisError, OSError) as exc:
            raise unavailable("REDIS_UNAVAILABLE", "Redis is unreachable; no cache figures") from exc
        return admin_pb2.GetCacheStatsResponse(
            processes=[process_stats(s) for s in snapshots if "cache" in s.figures]
        )

    async def invalidate_cache(
        self, request: admin_pb2.InvalidateCacheRequest, timeout: float
    ) -> admin_pb2.InvalidateCacheResponse:
        """Drop the selected entries from Redis and every process's local tier; audited."""
        errors: list[FieldViolation] = []
        if request.service not in _CACHES:
            errors.append(FieldViolation("service", f"must be one of {', '.join(sorted(_CACHES))}"))
        if request.tenant and not _TENANT_RE.fullmatch(request.tenant):
            errors.append(FieldViolation("tenant", "is not a tenant slug"))
        if request.group and not request.tenant:
            errors.append(FieldViolation("group", "needs tenant"))
        if request.key_prefix and not request.group:
            errors.append(FieldViolation("key_prefix", "needs group"))
        for field in ("group", "key_prefix"):
            value = getattr(request, field)
            if "\x00" in value or len(value.encode()) > 4096:
                errors.append(FieldViolation(field, "must be at most 4096 bytes without NUL"))
        if errors:
            raise invalid_argument(errors)
        prefix = b""
        if request.tenant:
            prefix = request.tenant.encode() + b"\x00"
        if request.group:
            prefix += request.group.encode() + b"\x00" + request.key_prefix.encode()
        try:
            removed = await invalidate_prefix(self._redis, _CACHES[request.service], prefix)
        except (RedisError, OSError) as exc:
            raise unavailable("REDIS_UNAVAILABLE", "Redis is unreachable; nothing was invalidated") from exc
        async with self._db.transaction(timeout=timeout) as conn:
            await record_audit(
                conn,
                f"cache/{request.service}",
                {
                    "tenant": request.tenant,
                    "group": request.group,
                    "key_prefix": request.key_prefix,
                    "redis_entries_removed": removed,
                },
                timeout=timeout,
            )
        return admin_pb2.InvalidateCacheResponse(redis_entries_removed=removed)

"""The database a service process opens: its pool, its slow-query log, its streaming replicas."""

from __future__ import annotations

from shared.cache.redisclient import open_redis
from shared.config.settings import Settings
from shared.storage.db import Database
from shared.storage.replicas import ReplicaSet
from shared.storage.slowlog import SlowLog

__all__ = ["open_service_database"]


async def open_service_database(settings: Settings, service: str) -> Database:
    """The pool a service process uses: ``settings``' database URL, pool sizes, slow-query
    threshold, and its streaming replicas when ``DATABASE_READ_URLS`` names some."""
    db = await Database.open(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        slow_query_ms=settings.slow_query_ms,
        application_name=f"strata-{service}",
        slow_log=SlowLog(open_redis(settings.redis_url), service) if settings.redis_url else None,
        acquire_timeout=settings.pool_acquire_timeout_s,
    )
    db.replicas = await ReplicaSet.open(settings, db, service)
    return db

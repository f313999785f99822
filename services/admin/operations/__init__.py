"""What an operator asks of the whole deployment, one module a concern.

Each call gathers what it can and says what it could not: a health check
answers NOT_SERVING with reasons when Postgres or Redis is down rather than
failing. Statistics read Postgres's own views through the service role (it
sees every Strata connection, since all services log in as it); migrations
run as the owner role, which the launcher hands to admin alone.

- :mod:`.health`: GetSystemHealth (every process, the backends, replicas, versions);
- :mod:`.database`: GetDatabaseStats (sizes, indexes, connections, slow statements);
- :mod:`.caches`: GetCacheStats and InvalidateCache;
- :mod:`.migrations`: GetMigrationStatus and ApplyMigrations;
- :mod:`.figures`: published process figures and durations as messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.admin.operations.caches import CacheControl
from services.admin.operations.database import DatabaseStats
from services.admin.operations.health import SystemHealth
from services.admin.operations.migrations import MigrationControl
from shared.cache.redisclient import Redis
from shared.config.settings import Settings
from shared.storage.db import Database
from shared.storage.migrations import migration_plan

__all__ = ["Operations"]


@dataclass(frozen=True, slots=True)
class Operations:
    """The operator's four concerns, sharing one Redis client."""

    health: SystemHealth
    database: DatabaseStats
    caches: CacheControl
    migrations: MigrationControl
    redis: Redis

    @classmethod
    def for_settings(cls, settings: Settings, db: Database, redis: Redis) -> Operations:
        """Operations on ``settings``' deployment, knowing this build's migrations."""
        migrations = MigrationControl(settings, db, migration_plan())
        return cls(
            SystemHealth(settings, db, redis, migrations),
            DatabaseStats(db, redis),
            CacheControl(db, redis),
            migrations,
            redis,
        )

    async def close(self) -> None:
        """Close the Redis client."""
        await self.redis.aclose()

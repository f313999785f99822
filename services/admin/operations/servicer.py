"""The operator's calls of ``strata.admin.v1.AdminService``: each needs the ``operator`` scope and is
answered by its concern's module (see :mod:`services.admin.operations`)."""

from __future__ import annotations

from strata.admin.v1 import admin_pb2

from services.admin.operations import Operations
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["OperationsServicer"]


class OperationsServicer:
    """Health, statistics, caches and migrations of the whole deployment."""

    def __init__(self, operations: Operations) -> None:
        self._operations = operations

    async def GetSystemHealth(
        self, request: admin_pb2.GetSystemHealthRequest, context: Context
    ) -> admin_pb2.GetSystemHealthResponse:
        return await self._operations.health.system_health(deadline_timeout(context))

    async def GetDatabaseStats(
        self, request: admin_pb2.GetDatabaseStatsRequest, context: Context
    ) -> admin_pb2.GetDatabaseStatsResponse:
        return await self._operations.database.database_stats(request, deadline_timeout(context))

    async def GetCacheStats(
        self, request: admin_pb2.GetCacheStatsRequest, context: Context
    ) -> admin_pb2.GetCacheStatsResponse:
        return await self._operations.caches.cache_stats()

    async def InvalidateCache(
        self, request: admin_pb2.InvalidateCacheRequest, context: Context
    ) -> admin_pb2.InvalidateCacheResponse:
        return await self._operations.caches.invalidate_cache(request, deadline_timeout(context))

    async def GetMigrationStatus(
        self, request: admin_pb2.GetMigrationStatusRequest, context: Context
    ) -> admin_pb2.GetMigrationStatusResponse:
        return await self._operations.migrations.migration_status(deadline_timeout(context))

    async def ApplyMigrations(
        self, request: admin_pb2.ApplyMigrationsRequest, context: Context
    ) -> admin_pb2.ApplyMigrationsResponse:
        return await self._operations.migrations.apply_migrations(deadline_timeout(context))

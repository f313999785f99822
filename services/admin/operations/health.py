"""GetSystemHealth: every process's health, the backends' round trips, replicas, figures, versions."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import RedisError
from strata.admin.v1 import admin_pb2

from services.admin.operations.figures import duration, error_text, process_stats, replica_health, timed
from services.admin.operations.migrations import MigrationControl
from shared.api.errors import StrataError
from shared.cache.redisclient import Redis
from shared.config.settings import Settings
from shared.observability.stats import read_process_stats
from shared.rpc.tls import internal_channel
from shared.storage.db import Database

__all__ = ["COMPONENTS", "SystemHealth"]

# Every gRPC process of a deployment, checked by GetSystemHealth.
COMPONENTS = ("kv", "tenants", "vector", "admin", "gateway")
_CHECK_TIMEOUT_S = 1.0


class SystemHealth:
    """Checks every process where settings say it runs, and the backends."""

    def __init__(self, settings: Settings, db: Database, redis: Redis, migrations: MigrationControl) -> None:
        self._settings = settings
        self._db = db
        self._redis = redis
        self._migrations = migrations

    async def system_health(self, timeout: float) -> admin_pb2.GetSystemHealthResponse:
        """Every component's health, the backends' round trips, published figures, migration versions."""
        checks = [
            self._check_component(component, address)
            for component in COMPONENTS
            for address in self._addresses(component)
        ]
        components, postgres, redis = await asyncio.gather(
            asyncio.gather(*checks), self._postgres_health(), self._redis_health()
        )
        response = admin_pb2.GetSystemHealthResponse(components=components, postgres=postgres, redis=redis)
        reasons = [
            f"{c.component} at {c.address} is not serving: {c.error or 'NOT_SERVING'}"
            for c in components
            if c.status != admin_pb2.SERVING_STATUS_SERVING
        ]
        if not postgres.reachable:
            reasons.append(f"postgres is unreachable: {postgres.error}")
        if not redis.reachable:
            reasons.append(f"redis is unreachable: {redis.error}")
        else:
            response.processes.extend(process_stats(s) for s in await read_process_stats(self._redis))
        if postgres.reachable:
            versions = self._migrations.schema_versions(await self._migrations.applied_versions(timeout))
            response.migrations.extend(versions)
            reasons.extend(
                f"schema {v.schema} is at migration {v.applied_version}; this build has {v.latest_version}"
                for v in versions
                if v.applied_version != v.latest_version
            )
        if self._db.replicas is not None:
            response.replicas.extend(replica_health(r) for r in self._db.replicas.status())
        response.reasons.extend(reasons)
        response.status = (
            admin_pb2.SERVING_STATUS_NOT_SERVING if reasons else admin_pb2.SERVING_STATUS_SERVING
        )
        return response

    def _addresses(self, component: str) -> tuple[str, ...]:
        return self._settings.upstreams_of(component)

    async def _check_component(self, component: str, address: str) -> admin_pb2.ComponentHealth:
        health = admin_pb2.ComponentHealth(component=component, address=address)
        started = time.perf_counter()
        # A service is called over the internal hop; the gateway's port is its public face, and
        # is checked as clients call it here (plaintext).
        channel = (
            grpc.aio.insecure_channel(address)
            if component == "gateway"
            else internal_channel(self._settings, address)
        )
        async with channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=_CHECK_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                health.status = admin_pb2.SERVING_STATUS_NOT_SERVING
                health.error = exc.code().name
            else:
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                health.status = (
                    admin_pb2.SERVING_STATUS_SERVING if serving else admin_pb2.SERVING_STATUS_NOT_SERVING
                )
                if not serving:
                    health.error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        health.round_trip.CopyFrom(duration(time.perf_counter() - started))
        return health

    async def _postgres_health(self) -> admin_pb2.BackendHealth:
        try:
            version, seconds = await timed(
                asyncio.wait_for(
                    self._db.fetchval("SHOW server_version", timeout=_CHECK_TIMEOUT_S), _CHECK_TIMEOUT_S
                )
            )
        except (StrataError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
            return admin_pb2.BackendHealth(reachable=False, error=error_text(exc))
        return admin_pb2.BackendHealth(reachable=True, round_trip=duration(seconds), version=str(version))

    async def _redis_health(self) -> admin_pb2.BackendHealth:
        try:
            _, seconds = await timed(asyncio.wait_for(self._redis.ping(), _CHECK_TIMEOUT_S))
            info = await self._redis.info("server")
        except (RedisError, OSError, TimeoutError) as exc:
            return admin_pb2.BackendHealth(reachable=False, error=error_text(exc))
        return admin_pb2.BackendHealth(
            reachable=True, round_trip=duration(seconds), version=str(info.get("redis_version", ""))
        )


def _verdict(serving: bool) -> admin_pb2.ServingStatus:
    return admin_pb2.SERVING_STATUS_SERVING if serving else admin_pb2.SERVING_STATUS_NOT_SERVING

"""Health, statistics, cache control and migrations of a whole deployment.

Each call gathers what it can and says what it could not: a health check
answers NOT_SERVING with reasons when Postgres or Redis is down rather than
failing. Statistics read Postgres's own views through the service role (it
sees every Strata connection, since all services log in as it); migrations
run as the owner role, which the launcher hands to admin alone.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import RedisError
from strata.admin.v1 import admin_pb2

from shared.audit import record_audit
from shared.backends import migration_plan
from shared.cache import CACHE_COUNTERS, invalidate_prefix
from shared.consistency import format_lsn
from shared.db import Database
from shared.errors import FieldViolation, StrataError, invalid_argument, unavailable
from shared.migrations import Migration, MigrationError, apply_migrations
from shared.migrations import status as migration_versions
from shared.redisclient import Redis
from shared.replicas import ReplicaStatus
from shared.settings import Settings
from shared.slowlog import read_slow_queries
from shared.stats import ProcessSnapshot, read_process_stats
from shared.timestamps import to_timestamp
from shared.tls import internal_channel

__all__ = ["COMPONENTS", "Operations"]

DOMAIN = "strata.admin.v1"
# Every gRPC process of a deployment, checked by GetSystemHealth.
COMPONENTS = ("kv", "tenants", "vector", "admin", "gateway")
SCHEMAS = ("kv", "tenants", "vector", "admin")
# InvalidateCache's service name → the cache's name (its Redis keys and channel).
_CACHES = {"kv": "kv", "tenants": "records"}
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_CHECK_TIMEOUT_S = 1.0
T = TypeVar("T")


def _replica_health(status: ReplicaStatus) -> admin_pb2.ReplicaHealth:
    return admin_pb2.ReplicaHealth(
        address=status.address,
        state=status.state,
        breaker=status.breaker,
        replay_lsn=format_lsn(status.replay_lsn),
        lag_bytes=status.lag_bytes,
        lag=_duration(status.lag_s),
        reads_in_flight=status.in_flight,
        latency=_duration(status.latency_ms / 1000),
        error=status.error,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


async def _timed(work: Awaitable[T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await work
    return result, time.perf_counter() - started


class Operations:
    """What an operator asks of the whole deployment."""

    def __init__(self, settings: Settings, db: Database, redis: Redis, plan: list[Migration]) -> None:
        self._settings = settings
        self._db = db
        self._redis = redis
        self._plan = plan

    @classmethod
    def for_settings(cls, settings: Settings, db: Database, redis: Redis) -> Operations:
        """Operations on ``settings``' deployment, knowing this build's migrations."""
        return cls(settings, db, redis, migration_plan(SCHEMAS))

    async def close(self) -> None:
        """Close the Redis client."""
        await self._redis.aclose()

    # -- health ------------------------------------------------------------

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
            if c.status != admin_pb2.SERVING_SERVING
        ]
        if not postgres.reachable:
            reasons.append(f"postgres is unreachable: {postgres.error}")
        if not redis.reachable:
            reasons.append(f"redis is unreachable: {redis.error}")
        else:
            response.processes.extend(_process_stats(s) for s in await read_process_stats(self._redis))
        if postgres.reachable:
            versions = self._schema_versions(await self._applied_versions(timeout))
            response.migrations.extend(versions)
            reasons.extend(
                f"schema {v.schema} is at migration {v.applied_version}; this build has {v.latest_version}"
                for v in versions
                if v.applied_version != v.latest_version
            )
        if self._db.replicas is not None:
            response.replicas.extend(_replica_health(r) for r in self._db.replicas.status())
        response.reasons.extend(reasons)
        response.status = admin_pb2.SERVING_NOT_SERVING if reasons else admin_pb2.SERVING_SERVING
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
                health.status = admin_pb2.SERVING_NOT_SERVING
                health.error = exc.code().name
            else:
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                health.status = admin_pb2.SERVING_SERVING if serving else admin_pb2.SERVING_NOT_SERVING
                if not serving:
                    health.error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        health.round_trip.CopyFrom(_duration(time.perf_counter() - started))
        return health

    async def _postgres_health(self) -> admin_pb2.BackendHealth:
        try:
            version, seconds = await _timed(
                asyncio.wait_for(
                    self._db.fetchval("SHOW server_version", timeout=_CHECK_TIMEOUT_S), _CHECK_TIMEOUT_S
                )
            )
        except (StrataError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
            return admin_pb2.BackendHealth(reachable=False, error=_error_text(exc))
        return admin_pb2.BackendHealth(reachable=True, round_trip=_duration(seconds), version=str(version))

    async def _redis_health(self) -> admin_pb2.BackendHealth:
        try:
            _, seconds = await _timed(asyncio.wait_for(self._redis.ping(), _CHECK_TIMEOUT_S))
            info = await self._redis.info("server")
        except (RedisError, OSError, TimeoutError) as exc:
            return admin_pb2.BackendHealth(reachable=False, error=_error_text(exc))
        return admin_pb2.BackendHealth(
            reachable=True, round_trip=_duration(seconds), version=str(info.get("redis_version", ""))
        )

    def _schema_versions(self, applied: dict[str, int]) -> list[admin_pb2.SchemaVersion]:
        """Each schema's applied version (from ``applied``) beside this build's latest."""
        latest: dict[str, int] = {}
        for migration in self._plan:
            latest[migration.schema] = max(latest.get(migration.schema, 0), migration.version)
        return [
            admin_pb2.SchemaVersion(
                schema=schema, applied_version=applied.get(schema, 0), latest_version=latest.get(schema, 0)
            )
            for schema in SCHEMAS
        ]

    # -- database ----------------------------------------------------------

    async def database_stats(
        self, request: admin_pb2.GetDatabaseStatsRequest, timeout: float
    ) -> admin_pb2.GetDatabaseStatsResponse:
        """Sizes, connections, cache hit ratio, index health, dead tuples, slow statements."""
        if not 0 <= request.limit <= 1000:
            raise invalid_argument([FieldViolation("limit", "must be between 0 and 1000")], domain=DOMAIN)
        limit = request.limit or 20
        response = admin_pb2.GetDatabaseStatsResponse()
        async with self._db.transaction(timeout=timeout) as conn:
            response.database_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
            for row in await conn.fetch(_TABLES_SQL, list(SCHEMAS), timeout=timeout):
                live, dead = row["live"], row["dead"]
                response.tables.add(
                    schema=row["schema"],
                    table=row["name"],
                    total_bytes=row["total_bytes"],
                    index_bytes=row["index_bytes"],
                    live_tuples=live,
                    dead_tuples=dead,
                    dead_ratio=dead / (live + dead) if live + dead else 0.0,
                    last_vacuum_time=to_timestamp(row["vacuumed"]),
                    last_analyze_time=to_timestamp(row["analyzed"]),
                )
            for row in await conn.fetch(_INDEXES_SQL, list(SCHEMAS), timeout=timeout):
                response.indexes.add(
                    schema=row["schema"],
                    table=row["table"],
                    index=row["index"],
                    bytes=row["bytes"],
                    scans=row["scans"],
                    unused=row["unused"],
                    duplicate_of=row["duplicate_of"] or "",
                )
            for row in await conn.fetch(_CONNECTIONS_SQL, timeout=timeout):
                response.connections.add(
                    application=row["application"], state=row["state"], count=row["count"]
                )
            response.cache_hit_ratio = await conn.fetchval(_HIT_RATIO_SQL, timeout=timeout)
            statements = await self._slowest_statements(conn, limit, timeout)
        if statements is not None:
            response.statement_stats_available = True
            response.slowest_statements.extend(statements)
        try:
            entries = await read_slow_queries(self._redis, limit)
        except (RedisError, OSError):
            entries = []  # the log lives in Redis: none to show while it is down
        for entry in entries:
            response.slow_queries.add(
                component=entry.component,
                statement=entry.statement,
                duration=_duration(entry.duration_ms / 1000),
                trace_id=entry.trace_id,
                time=to_timestamp(datetime.fromtimestamp(entry.time, UTC)),
            )
        return response

    async def _slowest_statements(
        self, conn: asyncpg.Connection, limit: int, timeout: float
    ) -> list[admin_pb2.StatementStats] | None:
        """pg_stat_statements' slowest by mean time; None when the extension is not usable here."""
        installed = await conn.fetchval(
            "SELECT to_regclass('pg_stat_statements') IS NOT NULL", timeout=timeout
        )
        if not installed:
            return None
        try:
            async with conn.transaction():  # a savepoint: "must be loaded via shared_preload_libraries"
                rows = await conn.fetch(_STATEMENTS_SQL, limit, timeout=timeout)
        except asyncpg.PostgresError:
            return None
        return [
            admin_pb2.StatementStats(
                query=row["query"][:2000],
                calls=row["calls"],
                mean_time=_duration(row["mean_ms"] / 1000),
                total_time=_duration(row["total_ms"] / 1000),
                rows=row["rows"],
            )
            for row in rows
        ]

    # -- caches ------------------------------------------------------------

    async def cache_stats(self) -> admin_pb2.GetCacheStatsResponse:
        """The published figures of every process that has a cache."""
        try:
            snapshots = await read_process_stats(self._redis)
        except (RedisError, OSError) as exc:
            raise unavailable("REDIS_UNAVAILABLE", "Redis is unreachable; no cache figures") from exc
        return admin_pb2.GetCacheStatsResponse(
            processes=[_process_stats(s) for s in snapshots if "cache" in s.figures]
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
            raise invalid_argument(errors, domain=DOMAIN)
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

    # -- migrations --------------------------------------------------------

    async def migration_status(self, timeout: float) -> admin_pb2.GetMigrationStatusResponse:
        """Applied and pending migrations per schema."""
        rows = await self._applied_migrations(timeout)
        done = {(r["schema_name"], r["version"]) for r in rows}
        applied: dict[str, int] = {}
        for schema, version in done:
            applied[schema] = max(applied.get(schema, 0), version)
        response = admin_pb2.GetMigrationStatusResponse(schemas=self._schema_versions(applied))
        for row in rows:
            response.applied.add(
                schema=row["schema_name"],
                version=row["version"],
                name=row["name"],
                checksum=row["checksum"],
                apply_time=to_timestamp(row["applied_at"]),
            )
        response.pending.extend(_migration_record(m) for m in self._plan if (m.schema, m.version) not in done)
        return response

    async def apply_migrations(self, timeout: float) -> admin_pb2.ApplyMigrationsResponse:
        """Apply what is pending as the owner role, under the start-up lock; audited."""
        owner_url = self._settings.migrate_database_url
        if not owner_url:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "STRATA_MIGRATE_DATABASE_URL is not set for the admin service",
                domain=DOMAIN,
            )
        conn = await asyncpg.connect(owner_url, timeout=min(timeout, 10.0))
        try:
            applied = await apply_migrations(conn, self._plan)
        except MigrationError as exc:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION, "MIGRATION_HISTORY_CONFLICT", str(exc), domain=DOMAIN
            ) from exc
        finally:
            await conn.close()
        async with self._db.transaction(timeout=timeout) as audit_conn:
            await record_audit(
                audit_conn,
                "migrations",
                {"applied": [f"{m.schema}/{m.version:04d}_{m.name}" for m in applied]},
                timeout=timeout,
            )
        return admin_pb2.ApplyMigrationsResponse(applied=[_migration_record(m) for m in applied])

    async def _applied_versions(self, timeout: float) -> dict[str, int]:
        """The highest applied migration per schema (the start-up runner's own reading)."""
        async with self._db.transaction(timeout=timeout) as conn:
            return await migration_versions(conn)

    async def _applied_migrations(self, timeout: float) -> list[asyncpg.Record]:
        """Every applied migration, by schema and number (none before the first run)."""
        exists = await self._db.fetchval(
            "SELECT to_regclass('public.strata_migrations') IS NOT NULL", timeout=timeout
        )
        if not exists:
            return []
        return await self._db.fetch(
            "SELECT schema_name, version, name, checksum, applied_at FROM public.strata_migrations "
            "ORDER BY schema_name, version",
            timeout=timeout,
        )


def _migration_record(migration: Migration) -> admin_pb2.MigrationRecord:
    return admin_pb2.MigrationRecord(
        schema=migration.schema, version=migration.version, name=migration.name, checksum=migration.checksum
    )


def _process_stats(snapshot: ProcessSnapshot) -> admin_pb2.ProcessStats:
    figures: dict[str, Any] = snapshot.figures
    stats = admin_pb2.ProcessStats(
        component=snapshot.component,
        instance=snapshot.instance,
        report_time=to_timestamp(datetime.fromtimestamp(snapshot.time, UTC)),
        calls_in_flight=int(figures.get("calls_in_flight", 0)),
    )
    pool = figures.get("pool")
    if isinstance(pool, dict):
        stats.pool.CopyFrom(admin_pb2.PoolStats(**{k: int(pool.get(k, 0)) for k in _POOL_FIELDS}))
    cache = figures.get("cache")
    if isinstance(cache, dict):
        counters = {k: int(cache.get(k, 0)) for k in (*CACHE_COUNTERS, "local_entries")}
        lookups = counters["local_hits"] + counters["redis_hits"] + counters["misses"]
        hits = counters["local_hits"] + counters["redis_hits"]
        stats.cache.CopyFrom(
            admin_pb2.CacheCounters(**counters, hit_ratio=hits / lookups if lookups else 0.0)
        )
    return stats


def _error_text(exc: BaseException) -> str:
    # Names the failure without echoing server messages (they can hold addresses or values).
    if isinstance(exc, StrataError):
        return exc.reason
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} ({getattr(exc, 'sqlstate', '')})"
    return type(exc).__name__


_POOL_FIELDS = ("size", "idle", "min_size", "max_size", "waiters")

_TABLES_SQL = """
SELECT s.schemaname AS schema, s.relname AS name,
       pg_total_relation_size(s.relid) AS total_bytes, pg_indexes_size(s.relid) AS index_bytes,
       s.n_live_tup AS live, s.n_dead_tup AS dead,
       greatest(s.last_vacuum, s.last_autovacuum) AS vacuumed,
       greatest(s.last_analyze, s.last_autoanalyze) AS analyzed
FROM pg_stat_user_tables s
WHERE s.schemaname = ANY($1::text[])
ORDER BY total_bytes DESC, schema, name
"""

# An index duplicates another of the same table when columns, expressions,
# predicate, operator classes and collations all match; the older one is kept.
_INDEXES_SQL = """
WITH ix AS (
    SELECT s.schemaname AS schema, s.relname AS "table", s.indexrelname AS "index",
           pg_relation_size(s.indexrelid) AS bytes, s.idx_scan AS scans,
           i.indisunique OR i.indisprimary AS constraint_backing, i.indexrelid,
           row_number() OVER w AS nth, first_value(s.indexrelname) OVER w AS first_name
    FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
    WHERE s.schemaname = ANY($1::text[])
    WINDOW w AS (
        PARTITION BY i.indrelid, i.indkey::text, i.indclass::text, i.indcollation::text,
                     coalesce(pg_get_expr(i.indexprs, i.indrelid), ''),
                     coalesce(pg_get_expr(i.indpred, i.indrelid), '')
        ORDER BY i.indexrelid
    )
)
SELECT schema, "table", "index", bytes, scans,
       scans = 0 AND NOT constraint_backing AS unused,
       CASE WHEN nth > 1 THEN first_name END AS duplicate_of
FROM ix
ORDER BY bytes DESC, schema, "table", "index"
"""

_CONNECTIONS_SQL = """
SELECT coalesce(application_name, '') AS application, coalesce(state, 'unknown') AS state,
       count(*)::int AS count
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
GROUP BY 1, 2
ORDER BY 1, 2
"""

_HIT_RATIO_SQL = """
SELECT coalesce(blks_hit::float8 / nullif(blks_hit + blks_read, 0), 0)
FROM pg_stat_database WHERE datname = current_database()
"""

_STATEMENTS_SQL = """
SELECT query, calls, mean_exec_time AS mean_ms, total_exec_time AS total_ms, rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY mean_exec_time DESC
LIMIT $1
"""

"""GetDatabaseStats: sizes, index health, connections, cache hit ratio, the slowest statements."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from redis.exceptions import RedisError
from strata.admin.v1 import admin_pb2

from services.admin.operations.figures import duration
from shared.api.errors import FieldViolation, invalid_argument
from shared.api.timestamps import to_timestamp
from shared.cache.redisclient import Redis
from shared.storage.db import Database
from shared.storage.migrations import SCHEMAS
from shared.storage.slowlog import read_slow_queries

__all__ = ["DatabaseStats"]


class DatabaseStats:
    """Postgres's own views, read through the service role, and the slow-query log in Redis."""

    def __init__(self, db: Database, redis: Redis) -> None:
        self._db = db
        self._redis = redis

    async def database_stats(
        self, request: admin_pb2.GetDatabaseStatsRequest, timeout: float
    ) -> admin_pb2.GetDatabaseStatsResponse:
        """Sizes, connections, cache hit ratio, index health, dead tuples, slow statements."""
        if not 0 <= request.limit <= 1000:
            raise invalid_argument([FieldViolation("limit", "must be between 0 and 1000")])
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
                duration=duration(entry.duration_ms / 1000),
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
                mean_time=duration(row["mean_ms"] / 1000),
                total_time=duration(row["total_ms"] / 1000),
                rows=row["rows"],
            )
            for row in rows
        ]


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

"""Published process figures, replica states and durations as admin messages."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from google.protobuf import duration_pb2
from strata.admin.v1 import admin_pb2

from shared.api.errors import StrataError
from shared.api.timestamps import to_timestamp
from shared.cache.local import CACHE_COUNTERS
from shared.observability.stats import ProcessSnapshot
from shared.storage.consistency import format_lsn
from shared.storage.replicas import ReplicaStatus

__all__ = ["duration", "error_text", "process_stats", "replica_health", "timed"]

T = TypeVar("T")
_POOL_FIELDS = ("size", "idle", "min_size", "max_size", "waiters")


def replica_health(status: ReplicaStatus) -> admin_pb2.ReplicaHealth:
    return admin_pb2.ReplicaHealth(
        address=status.address,
        state=status.state,
        breaker=status.breaker,
        replay_lsn=format_lsn(status.replay_lsn),
        lag_bytes=status.lag_bytes,
        lag=duration(status.lag_s),
        reads_in_flight=status.in_flight,
        latency=duration(status.latency_ms / 1000),
        error=status.error,
    )


def duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


async def timed(work: Awaitable[T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = await work
    return result, time.perf_counter() - started


def process_stats(snapshot: ProcessSnapshot) -> admin_pb2.ProcessStats:
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


def error_text(exc: BaseException) -> str:
    # Names the failure without echoing server messages (they can hold addresses or values).
    if isinstance(exc, StrataError):
        return exc.reason
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} ({getattr(exc, 'sqlstate', '')})"
    return type(exc).__name__

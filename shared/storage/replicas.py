"""Reads spread over Postgres streaming replicas, with the primary behind them.

:class:`ReplicaSet` holds one pool per replica (``DATABASE_READ_URLS``) and
decides, call by call, where a read that may use a replica goes:

- only to a replica whose breaker is closed, whose replay lag (bytes and
  seconds, from the last probe) is within bounds, and which has replayed the
  call's consistency token (:mod:`shared.storage.consistency`);
- among those, by the configured strategy: ``round_robin``,
  ``least_in_flight`` (fewest reads running there now) or ``lowest_latency``
  (smallest moving average of its read and probe times);
- to the primary when no replica qualifies, and again to the primary when a
  replica fails the read (connection lost, pool exhausted, a recovery
  conflict): the caller never hears of a replica's trouble.

A probe every ``replica_probe_interval_s`` asks each replica how far it has
replayed and the primary how far it has written. The breaker of a replica
opens after ``replica_failures_to_open`` consecutive failed reads or probes,
at once when its lag passes a bound or when it is no longer in recovery (a
promoted replica is another timeline, never a read target); after
``replica_open_s`` the next probe is its half-open trial, and a healthy
answer closes it.

Writes and transactions never come here: they use the primary's pool.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import asyncpg

from shared.api.errors import StrataError
from shared.config.settings import READ_STRATEGIES
from shared.storage.breaker import CircuitBreaker
from shared.storage.consistency import parse_lsn, required_lsn

if TYPE_CHECKING:
    from shared.config.settings import Settings
    from shared.storage.db import Database

__all__ = ["Replica", "ReplicaSet", "ReplicaStatus"]

T = TypeVar("T")
_log = logging.getLogger(__name__)
_EWMA = 0.2  # weight of the newest sample in a replica's latency average
# Errors of a read on a replica after which the same read on the primary is
# expected to succeed: the replica went away, or replay cancelled the query
# (40001 snapshot conflict, 57014 lock conflict with recovery).
_REPLICA_FAULTS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    OSError,
)
_FALLBACK_ERRORS: tuple[type[BaseException], ...] = (StrataError, *_REPLICA_FAULTS)
_PROBE_SQL = """
SELECT pg_is_in_recovery() AS standby,
       pg_last_wal_replay_lsn()::text AS replayed,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused
"""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the last probe and recent reads saw it (admin health shows these)."""

    address: str  # host:port, never the credentials
    state: str  # "streaming", "paused", "lagging", "unreachable", "not_a_replica", "unknown"
    breaker: str  # "closed", "open", "half-open"
    replay_lsn: int
    lag_bytes: int
    lag_s: float
    in_flight: int
    latency_ms: float
    error: str


class Replica:
    """One streaming replica: its pool (a :class:`Database`), breaker and last-probed position."""

    def __init__(self, address: str, db: Database, breaker: CircuitBreaker) -> None:
        self.address = address
        self.db = db
        self.breaker = breaker
        self.state = "unknown"
        self.replay_lsn = 0
        self.lag_bytes = 0
        self.lag_s = 0.0
        self.in_flight = 0
        self.latency_s = 0.0
        self.error = ""

    def observe_latency(self, seconds: float) -> None:
        self.latency_s = seconds if self.latency_s == 0.0 else (1 - _EWMA) * self.latency_s + _EWMA * seconds

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.address,
            self.state,
            self.breaker.state,
            self.replay_lsn,
            self.lag_bytes,
            round(self.lag_s, 3),
            self.in_flight,
            round(self.latency_s * 1000, 3),
            self.error,
        )


class ReplicaSet:
    """The replicas of one service process; see the module docstring for the rules."""

    def __init__(
        self,
        primary: Database,
        replicas: list[Replica],
        *,
        strategy: str = "least_in_flight",
        max_lag_bytes: int = 16 * 1024 * 1024,
        max_lag_s: float = 5.0,
        probe_interval_s: float = 0.5,
    ) -> None:
        if strategy not in READ_STRATEGIES:
            raise ValueError(f"unknown read strategy {strategy!r}")
        self.primary = primary
        self.replicas = replicas
        self.strategy = strategy
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_s = max_lag_s
        self.probe_interval_s = probe_interval_s
        self.primary_reads = 0  # reads the primary served (none qualified, or a replica failed)
        self.fallbacks = 0  # reads a replica failed and the primary then served
        self._turn = 0
        # (time, primary WAL position) per probe: how old a replica's position is.
        self._history: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=max(8, int(2 * max(max_lag_s, 1.0) / probe_interval_s) + 2)
        )
        self._prober: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: Settings, primary: Database, service: str) -> ReplicaSet | None:
        """The replicas of ``settings.database_read_urls`` (None when there are none), probing.

        A replica that is down at start does not stop the service: its pool
        connects lazily and the probe keeps its breaker open until it answers.
        """
        from shared.storage.db import Database

        if not settings.database_read_urls:
            return None
        replicas = []
        for url in settings.database_read_urls:
            db = await Database.open(
                url,
                min_size=0,
                max_size=settings.pool_max_size,
                slow_query_ms=settings.slow_query_ms,
                application_name=f"strata-{service}",
                acquire_timeout=settings.pool_acquire_timeout_s,
                retries=0,  # a failed read goes to the primary instead
            )
            # The set keeps this replica's breaker; the pool's own must never refuse a read it routes.
            db.breaker = CircuitBreaker(threshold=1 << 30)
            breaker = CircuitBreaker(settings.replica_failures_to_open, settings.replica_open_s)
            replicas.append(Replica(_address(url), db, breaker))
        replica_set = cls(
            primary,
            replicas,
            strategy=settings.read_strategy,
            max_lag_bytes=settings.replica_max_lag_bytes,
            max_lag_s=settings.replica_max_lag_s,
            probe_interval_s=settings.replica_probe_interval_s,
        )
        await replica_set.probe()
        replica_set.start()
        return replica_set

    def start(self) -> None:
        """Probe every ``probe_interval_s`` until :meth:`close`."""
        if self._prober is None:
            self._prober = asyncio.create_task(self._probe_forever(), name="replica-probe")

    async def close(self) -> None:
        """Stop probing and close every replica's pool."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        await asyncio.gather(*(r.db.close() for r in self.replicas), return_exceptions=True)

    # -- routing -------------------------------------------------------------

    def pick(self, required: int = 0) -> Replica | None:
        """The replica a read needing WAL position ``required`` goes to now, or None (the primary)."""
        candidates = [r for r in self.replicas if self._usable(r, required)]
        if not candidates:
            return None
        self._turn += 1
        start = self._turn % len(candidates)
        ordered = candidates[start:] + candidates[:start]  # ties go round
        if self.strategy == "round_robin":
            return ordered[0]
        if self.strategy == "least_in_flight":
            return min(ordered, key=lambda r: r.in_flight)
        return min(ordered, key=lambda r: r.latency_s)

    def _usable(self, replica: Replica, required: int) -> bool:
        return (
            replica.breaker.state == "closed"
            and replica.state in ("streaming", "paused")
            and replica.replay_lsn >= required
            and replica.lag_bytes <= self.max_lag_bytes
            and replica.lag_s <= self.max_lag_s
        )

    async def read(self, work: Callable[[Database], Awaitable[T]]) -> T:
        """Run ``work`` on a replica that qualifies (see :meth:`pick`), else on the primary.

        ``work`` gets the :class:`Database` to use and must only read. If the
        replica fails it, the replica's breaker hears of it and ``work`` runs
        again on the primary; errors of the read itself (bad SQL, a deadline)
        reach the caller as they would from the primary.
        """
        replica = self.pick(required_lsn())
        if replica is None:
            self.primary_reads += 1
            return await work(self.primary)
        replica.in_flight += 1
        began = time.monotonic()
        try:
            result = await work(replica.db)
        except TimeoutError:
            raise  # the call's own deadline: the primary would not have more time
        except _FALLBACK_ERRORS as exc:
            if isinstance(exc, StrataError) and exc.reason not in (
                "DATABASE_UNAVAILABLE",
                "DATABASE_POOL_EXHAUSTED",
            ):
                raise
            replica.breaker.record_failure()
            replica.error = f"{type(exc).__name__}: {exc}"[:200]
            _log.warning(
                "a replica failed a read; the primary serves it",
                extra={"replica": replica.address, "error": replica.error, "breaker": replica.breaker.state},
            )
            self.fallbacks += 1
            self.primary_reads += 1
            return await work(self.primary)
        finally:
            replica.in_flight -= 1
        replica.observe_latency(time.monotonic() - began)
        return result

    def status(self) -> list[ReplicaStatus]:
        """Every replica's last-known state, in configuration order."""
        return [r.status() for r in self.replicas]

    # -- probing -------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe()
            except Exception:
                _log.exception("replica probe failed")

    async def probe(self) -> None:
        """Ask the primary how far it has written and every replica how far it has replayed."""
        timeout = max(0.2, min(2.0, 2 * self.probe_interval_s))
        try:
            written = parse_lsn(
                await self.primary.fetchval("SELECT pg_current_wal_lsn()::text", timeout=timeout)
            )
        except Exception as exc:
            # Without the primary's position no lag is known; keep the replicas' last state.
            _log.warning("replica probe could not reach the primary", extra={"error": repr(exc)})
            written = None
        now = time.monotonic()
        if written is not None:
            self._history.append((now, written))
        await asyncio.gather(*(self._probe_one(r, written, now, timeout) for r in self.replicas))

    async def _probe_one(self, replica: Replica, written: int | None, now: float, timeout: float) -> None:
        began = time.monotonic()
        try:
            row = await replica.db.fetchrow(_PROBE_SQL, timeout=timeout)
        except Exception as exc:
            replica.state = "unreachable"
            replica.error = f"{type(exc).__name__}: {exc}"[:200]
            replica.breaker.record_failure()
            return
        assert row is not None
        replica.observe_latency(time.monotonic() - began)
        if not row["standby"]:
            replica.state = "not_a_replica"
            replica.error = "not in recovery: promoted, or not a replica at all"
            replica.breaker.trip()
            return
        replica.replay_lsn = parse_lsn(row["replayed"]) if row["replayed"] else 0
        if written is not None:
            replica.lag_bytes = max(0, written - replica.replay_lsn)
            replica.lag_s = self._age_of(replica.replay_lsn, now)
        replica.error = ""
        if replica.lag_bytes > self.max_lag_bytes or replica.lag_s > self.max_lag_s:
            replica.state = "lagging"
            replica.breaker.trip()
            return
        replica.state = "paused" if row["paused"] else "streaming"
        if replica.breaker.state != "open":  # closed, or half-open: this probe is its trial
            replica.breaker.record_success()

    def _age_of(self, replayed: int, now: float) -> float:
        """How long ago the primary was where the replica is: 0 when it has caught up."""
        newest_time, newest = self._history[-1]
        if replayed >= newest:
            return 0.0
        # The primary's first recorded position past the replica's: the replica is behind since then.
        for at, position in self._history:
            if position > replayed:
                return now - at
        return now - newest_time  # unreachable: newest > replayed


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"

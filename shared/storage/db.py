"""The Postgres pool every service uses.

:class:`Database` wraps one asyncpg pool with what a service needs around it:
retry with backoff and jitter when a connection is lost (reads always; writes
only when nothing was sent), a circuit breaker that fails fast while Postgres
is down, per-call timeouts taken from the gRPC deadline, and a slow-query log.

Strata never leaves session state on a connection (tenant settings are
transaction-local), so the pool skips asyncpg's reset round trip on release;
a connection released inside a transaction is still rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg

from shared.api.errors import Code, StrataError, unavailable
from shared.storage.breaker import CircuitBreaker
from shared.storage.consistency import note_commit, parse_lsn
from shared.storage.slowlog import SlowLog

if TYPE_CHECKING:
    from shared.storage.replicas import ReplicaSet

__all__ = ["Database", "Deadline", "deadline_timeout"]

T = TypeVar("T")
_log = logging.getLogger(__name__)

# Errors after which the same statement may succeed on a fresh connection.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    # The client's protocol state is inconsistent ("another operation is in
    # progress"): seen on a connection Postgres was shutting down under. The
    # connection is unusable; nothing of the new statement was sent.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
    OSError,
)


class Deadline(Protocol):
    """What a call's context tells of its deadline (``grpc.aio.ServicerContext`` is one)."""

    def time_remaining(self) -> float | None: ...


def deadline_timeout(context: Deadline | None, cap: float = 30.0) -> float:
    """Seconds left before the call's deadline (at most ``cap``), for statement timeouts.

    Raises DEADLINE_EXCEEDED when the deadline has already passed, so no
    statement is started that the caller will not wait for.
    """
    remaining: float | None = context.time_remaining() if context is not None else None
    if remaining is None:
        return cap
    if remaining <= 0.001:
        raise StrataError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the deadline passed")
    return min(cap, remaining)


class Database:
    """An asyncpg pool with retry, a circuit breaker and a slow-query log.

    Open with :meth:`open`; close with :meth:`close`. Example::

        db = await Database.open(settings.database_url, min_size=2, max_size=10)
        row = await db.fetchrow("SELECT 1 AS one", timeout=deadline_timeout(context))
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        slow: _SlowStatements | None = None,
        retries: int = 3,
        acquire_timeout: float = 1.0,
    ) -> None:
        self.pool = pool
        self.breaker = CircuitBreaker()
        self._slow = slow
        self._retries = retries
        self._acquire_timeout = acquire_timeout
        self._waiters = 0  # calls waiting for a pooled connection
        # Streaming replicas for reads that allow one (see read_replica); with
        # them, every write records the WAL position it reached (a consistency token).
        self.replicas: ReplicaSet | None = None
        self.latest_lsn = 0  # the newest WAL position a write of this process reached

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        slow_query_ms: float = 200.0,
        application_name: str = "strata",
        connect_timeout: float = 5.0,
        slow_log: SlowLog | None = None,
        acquire_timeout: float = 1.0,
        retries: int = 3,
    ) -> Database:
        """Open a pool on ``dsn``, retrying for up to ``connect_timeout`` s while Postgres starts.

        Every statement slower than ``slow_query_ms`` is logged, and appended
        to ``slow_log`` when given. A call waits at most ``acquire_timeout`` s
        for a pooled connection, then fails with UNAVAILABLE (see :meth:`_acquire`).
        ``retries``: how often a read is repeated after a lost connection.
        """
        slow = _SlowStatements(slow_query_ms / 1000.0, slow_log)
        deadline = time.monotonic() + connect_timeout
        delay = 0.05
        while True:
            try:
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    reset=_rollback_if_in_transaction,
                    server_settings={"application_name": application_name, "jit": "off"},
                    timeout=connect_timeout,
                    init=slow.watch,
                )
                return cls(pool, slow=slow, acquire_timeout=acquire_timeout, retries=retries)
            except _CONNECTION_ERRORS:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        """Close every connection (the replicas' too), waiting at most 5 s for ones in use."""
        if self.replicas is not None:
            await self.replicas.close()
        try:
            await asyncio.wait_for(self.pool.close(), 5.0)
        except TimeoutError:
            self.pool.terminate()
        if self._slow is not None and self._slow.log is not None:
            await self._slow.log.close()

    def pool_stats(self) -> dict[str, int]:
        """The pool's size, idle connections, bounds, and calls waiting for a connection."""
        return {
            "size": self.pool.get_size(),
            "idle": self.pool.get_idle_size(),
            "min_size": self.pool.get_min_size(),
            "max_size": self.pool.get_max_size(),
            "waiters": self._waiters,
        }

    @asynccontextmanager
    async def _acquire(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, waited for at most the acquire timeout (or ``timeout``, if shorter).

        An exhausted pool answers at once with UNAVAILABLE (nothing was sent:
        safe to retry) instead of letting calls pile up behind it until their
        deadlines. The wait is counted, so pool pressure shows in the
        process's published stats.
        """
        wait = self._acquire_timeout if timeout is None else min(timeout, self._acquire_timeout)
        self._waiters += 1
        try:
            conn = await self.pool.acquire(timeout=wait)
        except TimeoutError:
            if timeout is not None and timeout <= self._acquire_timeout:
                raise  # the call's own deadline ran out first
            raise unavailable(
                "DATABASE_POOL_EXHAUSTED",
                f"every database connection of this process is busy (waited {wait:g}s); retry",
                retry_delay_s=0.1,
            ) from None
        finally:
            self._waiters -= 1
        try:
            yield conn
        finally:
            await self.pool.release(conn)

    async def fetch(self, sql: str, *args: Any, timeout: float = 30.0) -> list[asyncpg.Record]:
        """Run a read; retried on connection loss."""
        return await self.run(
            lambda c: c.fetch(sql, *args, timeout=timeout), idempotent=True, timeout=timeout
        )

    async def fetchrow(self, sql: str, *args: Any, timeout: float = 30.0) -> asyncpg.Record | None:
        """Run a read returning at most one row; retried on connection loss."""
        return await self.run(
            lambda c: c.fetchrow(sql, *args, timeout=timeout), idempotent=True, timeout=timeout
        )

    async def fetchval(self, sql: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run a read returning one value; retried on connection loss."""
        return await self.run(
            lambda c: c.fetchval(sql, *args, timeout=timeout), idempotent=True, timeout=timeout
        )

    async def write_row(self, sql: str, *args: Any, timeout: float = 30.0) -> asyncpg.Record | None:
        """Run one write statement (autocommit) returning at most one row.

        Not retried once sent: a lost connection after sending leaves the
        outcome unknown, which the caller hears as UNAVAILABLE.
        """
        return await self.run(
            self._noting_commit(lambda c: c.fetchrow(sql, *args, timeout=timeout), timeout),
            idempotent=False,
            timeout=timeout,
        )

    async def write_rows(self, sql: str, *args: Any, timeout: float = 30.0) -> list[asyncpg.Record]:
        """As :meth:`write_row`, returning all rows."""
        return await self.run(
            self._noting_commit(lambda c: c.fetch(sql, *args, timeout=timeout), timeout),
            idempotent=False,
            timeout=timeout,
        )

    async def read_replica(self, work: Callable[[Database], Awaitable[T]]) -> T:
        """Run a read a streaming replica may serve: ``work(db)`` on a replica's Database or this one.

        Without replicas, ``work(self)``. With them, see :meth:`ReplicaSet.read`:
        a replica that has replayed the call's consistency token, else the
        primary. ``work`` must only read (use ``tenant_transaction(read_only=True)``).
        """
        if self.replicas is None:
            return await work(self)
        return await self.replicas.read(work)

    def _noting_commit(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], timeout: float
    ) -> Callable[[asyncpg.Connection], Awaitable[T]]:
        """``work``, then (with replicas) the WAL position it reached, as the call's consistency token."""
        if self.replicas is None:
            return work

        async def noted(conn: asyncpg.Connection) -> T:
            result = await work(conn)
            await self._note_commit(conn, timeout)
            return result

        return noted

    async def _note_commit(self, conn: asyncpg.Connection, timeout: float) -> None:
        # The insert position after the commit is at or past its commit record:
        # a replica that replayed this far sees the write. Without replicas no
        # read waits for it: nothing to ask.
        if self.replicas is None:
            return
        lsn = parse_lsn(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text", timeout=timeout))
        self.latest_lsn = max(self.latest_lsn, lsn)
        note_commit(lsn)

    async def run(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> T:
        """Run ``work`` on a pooled connection with breaker and retry.

        ``idempotent`` work is retried on connection loss with exponential
        backoff and jitter; other work only when the connection could not be
        acquired (nothing was sent). ``timeout``: the call's time left, which
        also bounds the wait for a connection.
        """
        attempt = 0
        while True:
            if not self.breaker.allow():
                raise unavailable(
                    "DATABASE_UNAVAILABLE", "the database is unavailable; retry", retry_delay_s=1.0
                )
            acquired = False
            try:
                async with self._acquire(timeout) as conn:
                    acquired = True
                    result = await work(conn)
                self.breaker.record_success()
                return result
            except TimeoutError:
                raise  # the statement outlived the call's deadline: not a connection fault
            except _CONNECTION_ERRORS as exc:
                # Postgres restarted or a connection died: every pooled
                # connection is suspect, so replace them all, not one per call.
                await self.pool.expire_connections()
                if not acquired:
                    self.breaker.record_failure()  # could not even connect
                # InterfaceError: the connection was already closed, nothing was sent.
                unsent = not acquired or isinstance(exc, asyncpg.exceptions.InterfaceError)
                attempt += 1
                if not (idempotent or unsent) or attempt > self._retries:
                    raise unavailable(
                        "DATABASE_UNAVAILABLE", "the database connection was lost; retry", retry_delay_s=0.5
                    ) from exc
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * (0.5 + random.random()))

    @asynccontextmanager
    async def transaction(self, *, timeout: float = 30.0) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a transaction, committed on clean exit.

        Not retried: the body decides what is safe to repeat. Connection loss
        surfaces as UNAVAILABLE.
        """
        async with self._guarded(), self._acquire(timeout) as conn:
            async with conn.transaction():
                yield conn
            await self._note_commit(conn, timeout)

    @asynccontextmanager
    async def tenant_transaction(
        self,
        tenant: str,
        *,
        timeout: float = 30.0,
        settings: Mapping[str, str] | None = None,
        read_only: bool = False,
    ) -> AsyncIterator[asyncpg.Connection]:
        """A transaction in which row-level security shows only ``tenant``'s rows.

        The tenant and any further ``settings`` (planner or index parameters
        for this transaction's statements) are transaction-local
        (``set_config(..., true)``): they end with the transaction and never
        reach the connection's next user. BEGIN and the settings go in one
        round trip. Committed on clean exit; otherwise the pool's release
        (shielded from cancellation) rolls it back. ``read_only`` transactions
        (BEGIN READ ONLY) are the ones a replica may run (see :meth:`read_replica`);
        the others, with replicas configured, record their commit's WAL position.
        """
        assignments = {"strata.tenant_id": tenant, **(settings or {})}
        begin = ("BEGIN READ ONLY; SELECT " if read_only else "BEGIN; SELECT ") + ", ".join(
            f"set_config({_literal(name)}, {_literal(value)}, true)" for name, value in assignments.items()
        )
        async with self._guarded(), self._acquire(timeout) as conn:
            await conn.execute(begin, timeout=timeout)
            yield conn
            await conn.execute("COMMIT", timeout=timeout)
            if not read_only:
                await self._note_commit(conn, timeout)

    @asynccontextmanager
    async def _guarded(self) -> AsyncIterator[None]:
        # The breaker and the connection-loss mapping shared by both kinds of transaction.
        if not self.breaker.allow():
            raise unavailable("DATABASE_UNAVAILABLE", "the database is unavailable; retry", retry_delay_s=1.0)
        try:
            yield
        except TimeoutError:
            raise
        except _CONNECTION_ERRORS as exc:
            await self.pool.expire_connections()
            raise unavailable(
                "DATABASE_UNAVAILABLE", "the database connection was lost; retry", retry_delay_s=0.5
            ) from exc
        self.breaker.record_success()


def _literal(value: str) -> str:
    """``value`` as an escape-string SQL literal: safe whatever standard_conforming_strings says."""
    if "\x00" in value:
        raise ValueError("a transaction setting may not contain NUL")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class _SlowStatements:
    """Watches every statement of every pooled connection and reports the slow ones."""

    def __init__(self, threshold_s: float, log: SlowLog | None) -> None:
        self.threshold_s = threshold_s
        self.log = log

    async def watch(self, conn: asyncpg.Connection) -> None:
        """Pool ``init`` hook: observe this connection's statements."""
        conn.add_query_logger(self._observe)

    def _observe(self, record: Any) -> None:
        # Runs in the calling task's context (asyncpg uses call_soon): the trace id is the call's.
        if record.elapsed < self.threshold_s:
            return
        _log.warning(
            "slow query",
            extra={"duration_ms": round(record.elapsed * 1000, 2), "statement": record.query[:500]},
        )
        if self.log is not None:
            self.log.record(record.query, record.elapsed)


async def _rollback_if_in_transaction(conn: asyncpg.Connection) -> None:
    # Replaces asyncpg's reset (RESET ALL, UNLISTEN *, …: one round trip per
    # release). Nothing in Strata sets session state, so only an abandoned
    # transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")

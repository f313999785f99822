"""The newest store revision this process knows of, and waiting for a newer one.

Every KV write ends with ``pg_notify('strata_kv', revision)``. One dedicated
connection per process LISTENs on that channel; watchers park on
:meth:`RevisionFeed.wait_beyond` and re-read the change log when woken. A
slow safety poll covers notifications lost while the listening connection was
down (Postgres restarted): the feed reconnects and wakes everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from shared.observability.telemetry import untraced

__all__ = ["FeedClosed", "RevisionFeed"]

CHANNEL = "strata_kv"
_log = logging.getLogger(__name__)


class FeedClosed(Exception):
    """The process is shutting down; watchers should end their streams."""


class RevisionFeed:
    """Tracks the store revision from LISTEN/NOTIFY plus a periodic poll."""

    def __init__(self, dsn: str, *, poll_interval_s: float = 1.0) -> None:
        self._dsn = dsn
        self._poll_interval_s = poll_interval_s
        self.revision = 0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    def start(self) -> None:
        """Start listening (call inside the event loop)."""
        self._task = asyncio.create_task(self._run(), name="kv-revision-feed")

    async def close(self) -> None:
        """Wake every watcher with :class:`FeedClosed` and stop listening."""
        self._closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    def observe(self, revision: int) -> None:
        """Record a revision seen by this process (a write it made, a notification)."""
        if revision > self.revision:
            self.revision = revision
            self._wake()

    async def wait_beyond(self, revision: int, timeout: float) -> None:
        """Return once the known revision exceeds ``revision``, or after ``timeout`` s.

        Raises :class:`FeedClosed` when the feed closes.
        """
        if self._closed:
            raise FeedClosed
        if self.revision > revision:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
        if self._closed:
            raise FeedClosed

    def _wake(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.observe(int(payload))

    async def _run(self) -> None:
        with untraced():
            await self._listen()

    async def _listen(self) -> None:
        while not self._closed:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5.0)
                self._conn = conn
                await conn.add_listener(CHANNEL, self._on_notify)
                # Anything committed while not listening is picked up here.
                self.observe(await conn.fetchval("SELECT current FROM kv.store_revision"))
                self._wake()
                while not conn.is_closed():
                    await asyncio.sleep(self._poll_interval_s)
                    self.observe(await conn.fetchval("SELECT current FROM kv.store_revision", timeout=5.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("revision feed lost its connection; reconnecting", extra={"error": repr(exc)})
            finally:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
            await asyncio.sleep(0.5)

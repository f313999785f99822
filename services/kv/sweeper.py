"""Background upkeep: remove expired keys and compact the change log.

Expired keys are already invisible to every read; the sweep removes them and
logs an EXPIRE event for each, so watchers learn of the expiry in revision
order. Several replicas may sweep at once: the functions serialise on the
store revision row and never bump a revision for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.kv.revisions import RevisionFeed
from services.kv.store import KvStore
from shared.observability.telemetry import untraced

__all__ = ["Sweeper"]

_log = logging.getLogger(__name__)
_SWEEP_BATCH = 1000
_COMPACT_EVERY_S = 30.0


class Sweeper:
    """Runs the sweep every ``interval_s`` and compaction every 30 s."""

    def __init__(self, store: KvStore, feed: RevisionFeed, *, interval_s: float, keep_revisions: int) -> None:
        self._store = store
        self._feed = feed
        self._interval_s = interval_s
        self._keep = keep_revisions
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop (inside the event loop)."""
        self._task = asyncio.create_task(self._run(), name="kv-sweeper")

    async def close(self) -> None:
        """Stop the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def sweep_once(self) -> int:
        """Remove expired keys until none is left; how many were removed."""
        total = 0
        while True:
            revision, removed = await self._store.sweep_expired(_SWEEP_BATCH)
            if revision is not None:
                self._feed.observe(revision)
            total += removed
            if removed < _SWEEP_BATCH:
                return total

    async def _run(self) -> None:
        with untraced():
            await self._loop()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_compaction = loop.time() + _COMPACT_EVERY_S
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep_once()
                if loop.time() >= next_compaction:
                    next_compaction = loop.time() + _COMPACT_EVERY_S
                    await self._store.compact(self._keep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("kv upkeep failed; will retry", extra={"error": repr(exc)})

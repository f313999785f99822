"""Group commit: writes that arrive while one batch is being written go together in the next.

One batch per instance is in flight at a time (KV's puts would queue on the
store revision's row lock anyway; the cache's write-through shares one Redis
pipeline). Everything that arrives meanwhile waits and is written as the
next batch, so under load each round trip carries many writes and alone a
write goes straight through: no timer, no added latency.

A batch runs as its own task, in the context of its first write's call, so
its database span belongs to that call's trace; a caller that gives up does
not cancel the batch others share (the write may still land, as any write
already sent may). If a batch fails on a statement error rather than the
connection, its writes are retried one by one, so a bad entry fails alone.

An optional ``after`` step (KV: recording a batch's writes in the cache) runs
once a batch is written and before its writers hear back, but outside the
one-at-a-time section: the next batch's write starts meanwhile, so a
database round trip and a Redis round trip overlap instead of adding up.
``after`` steps start in batch order; each must tolerate a later batch's
step finishing first (the cache's sets are revision-guarded).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg

__all__ = ["GroupCommit", "finish_despite_caller"]

E = TypeVar("E")  # one write
R = TypeVar("R")  # its result
_log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending(Generic[E, R]):
    entry: E
    timeout: float
    future: asyncio.Future[R]
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class GroupCommit(Generic[E, R]):
    """Batches ``write(entries, timeout) -> results`` (one result per entry, in order)."""

    def __init__(
        self,
        write: Callable[[Sequence[E], float], Awaitable[list[R]]],
        max_entries: int = 256,
        split_on: tuple[type[Exception], ...] = (asyncpg.PostgresError,),
        after: Callable[[Sequence[E], list[R]], Awaitable[None]] | None = None,
    ) -> None:
        """``split_on``: errors of one bad entry (not of the connection), after
        which a batch's entries are written again one by one. ``after``: told
        each written batch's entries and results before its writers are; an
        error it raises is logged, and the writers get their results anyway."""
        self._write = write
        self._max = max_entries
        self._split_on = split_on
        self._after = after
        self._queue: list[_Pending[E, R]] = []
        self._inflight: asyncio.Task[None] | None = None  # the batch being written
        self._tasks: set[asyncio.Task[None]] = set()  # every batch not yet answered
        self.batches = 0  # figures for tests and benchmarks
        self.entries = 0

    async def submit(self, entry: E, timeout: float) -> R:
        """Write ``entry`` in the next batch; its result, or the exception the write raised."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._queue.append(_Pending(entry, timeout, future))
        if self._inflight is None:
            self._launch()
        return await asyncio.shield(future)

    async def drain(self) -> None:
        """Wait until nothing is queued, being written or waiting for its ``after`` step."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _launch(self) -> None:
        batch = self._queue[: self._max]
        del self._queue[: len(batch)]
        task = asyncio.get_running_loop().create_task(self._flush(batch), context=batch[0].context)
        self._inflight = task
        self._tasks.add(task)
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._release(task)

    def _release(self, task: asyncio.Task[Any] | None) -> None:
        """Let the next batch be written, once ``task``'s write is over."""
        if self._inflight is task:
            self._inflight = None
            if self._queue:
                self._launch()

    async def _flush(self, batch: list[_Pending[E, R]]) -> None:
        self.batches += 1
        self.entries += len(batch)
        timeout = max(p.timeout for p in batch)
        try:
            results = await self._write([p.entry for p in batch], timeout)
        except self._split_on as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            _log.warning("batched write failed; writing its entries one by one", extra={"error": repr(exc)})
            for pending in batch:
                try:
                    result = (await self._write([pending.entry], pending.timeout))[0]
                except Exception as single:
                    _settle(pending, single)
                else:
                    await self._answer([pending], [result], release=False)
            return
        except BaseException as exc:
            for pending in batch:
                _settle(pending, exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        await self._answer(batch, results, release=True)

    async def _answer(self, batch: list[_Pending[E, R]], results: list[R], *, release: bool) -> None:
        """Run the ``after`` step (the next batch's write free to start), then settle the writers."""
        if self._after is not None:
            if release:
                self._release(asyncio.current_task())
            try:
                await self._after([p.entry for p in batch], results)
            except Exception:
                _log.exception("the step after a batched write failed")
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result)


def _settle(pending: _Pending[E, R], outcome: object) -> None:
    if pending.future.done():
        return
    if isinstance(outcome, BaseException):
        pending.future.set_exception(outcome)
    else:
        pending.future.set_result(outcome)  # type: ignore[arg-type]


async def finish_despite_caller(work: Coroutine[Any, Any, R]) -> R:
    """Await ``work`` in a task of its own: a caller that gives up does not stop it.

    The guarantee a batch gives the writes it carries, for one write done alone.
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that gave up never reads its outcome; reading it here keeps asyncio quiet.
    if not future.cancelled():
        future.exception()

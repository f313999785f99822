"""Invalidations between processes: each cache's processes hear every other's writes over Redis
pub/sub and drop the local entries they make stale; an operator's prefix drop reaches them the same
way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from shared.cache.entries import (
    DROP_PREFIX,
    glob_escape,
    invalidation_channel,
    parse_invalidations,
    redis_key_prefix,
)
from shared.cache.local import LocalTier
from shared.cache.redisclient import Redis, ready

__all__ = ["POLL_S", "InvalidationListener", "invalidate_prefix"]

# How often the listener looks up from Redis to see whether it should stop.
POLL_S = 1.0


async def invalidate_prefix(redis: Redis, name: str, prefix: bytes) -> int:
    """Drop every entry of cache ``name`` whose key starts with ``prefix`` (b"": all), everywhere.

    Redis entries are unlinked; every process drops its local ones on hearing
    the broadcast. Returns how many Redis entries were removed. A fill that
    read Postgres before the call is refused: its lease is unlinked too.
    """
    pattern = glob_escape(redis_key_prefix(name) + prefix) + b"*"
    removed = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += await redis.unlink(*batch)
            batch.clear()
    if batch:
        removed += await redis.unlink(*batch)
    await redis.publish(invalidation_channel(name), DROP_PREFIX + prefix)
    return removed


class InvalidationListener:
    """Applies the invalidations published on one cache's channel to this process's local tier.

    A subscription lost and made again clears the local tier: what was
    published meanwhile was missed. Redis errors go to ``on_error`` and the
    subscription is retried after ``retry_s``.
    """

    def __init__(
        self,
        redis: Redis,
        channel: str,
        local: LocalTier,
        on_error: Callable[[BaseException], None],
        retry_s: float,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._local = local
        self._on_error = on_error
        self._retry_s = retry_s
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (inside the event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="cache-invalidations")

    async def close(self) -> None:
        """Stop listening.

        redis-py can swallow a cancellation that lands inside a blocking read,
        so the listener also stops on its own (it polls every ``POLL_S``);
        close never waits much longer than that for it.
        """
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2 * POLL_S)

    async def _listen(self) -> None:
        subscribed_before = False
        while not self._closed:
            try:
                pubsub = (await ready(self._redis)).pubsub(ignore_subscribe_messages=True)
            except Exception as exc:
                self._on_error(exc)
                await asyncio.sleep(self._retry_s)
                continue
            try:
                await pubsub.subscribe(self._channel)
                if subscribed_before:
                    # Invalidations missed while unsubscribed: local entries may be stale.
                    self._local.clear()
                subscribed_before = True
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
                    if message is None:
                        continue
                    data = message["data"]
                    if data.startswith(DROP_PREFIX):
                        self._local.drop_prefix(data[len(DROP_PREFIX) :])
                        continue
                    for revision, key in parse_invalidations(data):
                        self._local.invalidate(revision, key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                self._on_error(exc)
                await asyncio.sleep(self._retry_s)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), POLL_S)

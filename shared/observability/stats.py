"""What each running process says about itself: published to Redis, read by admin.

A :class:`ProcessReporter` writes one JSON snapshot per process (calls in
flight, and whatever sources the process registered: its Postgres pool, its
cache) under ``strata:process:<component>:<instance>`` every few seconds,
with a TTL of three intervals, so a process that stops disappears on its
own. Redis down: snapshots are skipped, nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from shared.cache.redisclient import Redis
from shared.observability.telemetry import untraced

__all__ = ["ProcessReporter", "ProcessSnapshot", "read_process_stats"]

# One hash slot for every process's key (the part in braces): admin reads them all with one MGET,
# which a Redis Cluster allows only within a slot.
_KEY_PREFIX = "{strata:process}:"
_log = logging.getLogger(__name__)

StatsSource = Callable[[], Any]  # returns something JSON-serialisable


@dataclass(frozen=True, slots=True)
class ProcessSnapshot:
    """One process's last published figures."""

    component: str
    instance: str
    time: float  # Unix seconds
    figures: dict[str, Any]


class ProcessReporter:
    """Publishes this process's figures every ``interval_s`` seconds."""

    def __init__(
        self,
        redis: Redis,
        component: str,
        interval_s: float = 5.0,
        sources: dict[str, StatsSource] | None = None,
    ) -> None:
        self._redis = redis
        self._component = component
        self._instance = f"{socket.gethostname()}:{os.getpid()}"
        self._interval_s = interval_s
        self._sources: dict[str, StatsSource] = {} if sources is None else sources
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        """Where this process's snapshot lives."""
        return f"{_KEY_PREFIX}{self._component}:{self._instance}"

    def add_source(self, name: str, source: StatsSource) -> None:
        """Publish ``source()`` under ``name`` in every snapshot."""
        self._sources[name] = source

    def start(self) -> None:
        """Start publishing (inside the event loop)."""
        self._task = asyncio.create_task(self._run(), name="process-stats")

    async def publish(self) -> None:
        """Publish one snapshot now."""
        figures = {name: source() for name, source in self._sources.items()}
        body = json.dumps(
            {"component": self._component, "instance": self._instance, "time": time.time(), **figures}
        )
        await self._redis.set(self.key, body, px=int(self._interval_s * 3000))

    async def close(self) -> None:
        """Stop publishing, withdraw the snapshot, close the client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self.key)
        await self._redis.aclose()

    async def _run(self) -> None:
        with untraced():
            while True:
                try:
                    await self.publish()
                except (RedisError, OSError) as exc:
                    _log.debug("process stats not published", extra={"error": repr(exc)})
                await asyncio.sleep(self._interval_s)


async def read_process_stats(redis: Redis) -> list[ProcessSnapshot]:
    """Every live process's last snapshot, by component then instance."""
    keys = [key async for key in redis.scan_iter(match=f"{_KEY_PREFIX}*", count=1000)]
    if not keys:
        return []
    found = []
    for raw in await redis.mget(keys):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            data = json.loads(raw)
            component, instance, at = (
                str(data.pop("component")),
                str(data.pop("instance")),
                float(data.pop("time")),
            )
        except (ValueError, KeyError, TypeError):
            continue
        found.append(ProcessSnapshot(component, instance, at, data))
    return sorted(found, key=lambda s: (s.component, s.instance))

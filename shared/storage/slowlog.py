"""The services' slow-query log: a capped Redis stream every process appends to and admin reads.

:class:`Database` reports each statement slower than ``STRATA_SLOW_QUERY_MS``
here (the statement text, never its parameters), with its duration and trace
id. Appends are fire-and-forget: a slow or absent Redis never delays a call,
and entries are dropped rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from redis.exceptions import RedisError

from shared.cache.redisclient import Redis

__all__ = ["STREAM", "SlowLog", "SlowQueryEntry", "read_slow_queries"]

STREAM = "strata:slowlog"
_MAX_ENTRIES = 10_000  # approximate cap (XADD MAXLEN ~)
_MAX_PENDING = 100  # appends in flight before new ones are dropped
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlowQueryEntry:
    """One slow statement as recorded."""

    component: str
    statement: str
    duration_ms: float
    trace_id: str
    time: float  # Unix seconds


class SlowLog:
    """Appends slow statements of one process (``component``) to the stream."""

    def __init__(self, redis: Redis, component: str) -> None:
        self._redis = redis
        self._component = component
        self._pending: set[asyncio.Task[None]] = set()
        self.dropped = 0

    def record(self, statement: str, duration_s: float) -> None:
        """Queue one entry (returns at once; the current span gives the trace id)."""
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1
            return
        context = trace.get_current_span().get_span_context()
        fields: dict[Any, Any] = {
            "component": self._component,
            "statement": statement[:500],
            "duration_ms": f"{duration_s * 1000:.3f}",
            "trace_id": format(context.trace_id, "032x") if context.is_valid else "",
            "time": f"{time.time():.3f}",
        }
        task = asyncio.create_task(self._append(fields))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _append(self, fields: dict[Any, Any]) -> None:
        try:
            await self._redis.xadd(STREAM, fields, maxlen=_MAX_ENTRIES, approximate=True)
        except (RedisError, OSError) as exc:
            self.dropped += 1
            _log.debug("slow-query log append failed", extra={"error": repr(exc)})

    async def close(self) -> None:
        """Wait briefly for appends in flight, then close the client."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=1.0)
        await self._redis.aclose()


async def read_slow_queries(redis: Redis, limit: int) -> list[SlowQueryEntry]:
    """The newest ``limit`` entries, newest first."""
    entries = await redis.xrevrange(STREAM, count=limit) or []
    found = []
    for _, fields in entries:
        if not fields:
            continue
        text = {_text(k): _text(v) for k, v in fields.items()}
        try:
            found.append(
                SlowQueryEntry(
                    text.get("component", ""),
                    text.get("statement", ""),
                    float(text.get("duration_ms", "0")),
                    text.get("trace_id", ""),
                    float(text.get("time", "0")),
                )
            )
        except ValueError:
            continue  # not one of ours
    return found


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value

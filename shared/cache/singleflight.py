"""One run of the same work at a time: callers asking for a key while its work runs share its result.

As Go's ``singleflight.Group``: the gateway's key lookups, its rate-limit
refills and the cache's fills on a miss each ask Redis, Postgres or admin once
per key however many calls miss together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Concurrent :meth:`do` calls for one key share one run of the work."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    def running(self, key: K) -> bool:
        """Whether work for ``key`` is under way (a :meth:`do` now would share it)."""
        return key in self._flights

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """``work()``'s result, or that of the work for ``key`` already under way.

        The work runs as a task of its own, so a caller that is cancelled (its
        deadline passed) stops waiting without failing the others; the work
        goes on to its end. Its exception is every waiter's.
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(work())
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        # shield: a cancelled waiter leaves the work running (and marks its exception read).
        return await asyncio.shield(flight)

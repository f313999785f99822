"""The call gate: how many calls one process works on, and whether it still takes new ones."""

from __future__ import annotations

import asyncio

from shared.api.errors import Code, StrataError

__all__ = ["CallGate"]


class CallGate:
    """Admits calls until closed or full, and knows how many are in flight.

    ``limit`` bounds the calls (streams included) one process works on: past
    it a call is refused at once with RESOURCE_EXHAUSTED, rather than queuing
    for the event loop, the pool and Postgres until every caller's deadline.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.inflight = 0
        self.limit = limit
        self.closed = False
        self.refused = 0  # calls refused because the gate was full
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Count a call in, or raise: UNAVAILABLE while draining, RESOURCE_EXHAUSTED when full."""
        if self.closed:
            raise StrataError(
                Code.UNAVAILABLE,
                "SHUTTING_DOWN",
                "the server is shutting down; retry on another instance",
                retry_delay_s=0.1,
            )
        if self.inflight >= self.limit:
            self.refused += 1
            raise StrataError(
                Code.RESOURCE_EXHAUSTED,
                "OVERLOADED",
                f"this process is already serving {self.limit} calls; retry shortly",
                retry_delay_s=0.1,
            )
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if ``timeout`` s passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

"""Channels to the services behind the gateway: round robin over addresses, failed ones skipped.

Each address gets its own channel and a health watcher (grpc.health.v1
Check every second). :meth:`Upstream.pick` walks the addresses round robin,
skipping those that are not serving or whose connection has failed; when none
qualifies it still returns one, so the call fails with the real error.

Server streams (Watch, Backup) travel on connections of their own
(:meth:`Upstream.pick_stream`), never on the one unary calls use: an HTTP/2
connection carries at most ``STRATA_MAX_CONCURRENT_STREAMS`` calls at once, and
idle streams holding every slot would leave unary calls waiting until their
deadline. Each address gets enough stream connections for the gateway's
whole stream limit, and a stream takes the least loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.rpc.tls import open_channel

__all__ = ["Upstream"]

_log = logging.getLogger(__name__)
_BAD_STATES = frozenset({grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN})


class _Address:
    def __init__(
        self,
        address: str,
        options: list[tuple[str, int]],
        stream_connections: int,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.address = address
        self.channel = open_channel(address, credentials, options=options)
        # A local subchannel pool gives each stream channel a connection of its own.
        self.stream_channels = [
            open_channel(
                address,
                credentials,
                options=[*options, ("grpc.use_local_subchannel_pool", 1), ("strata.stream_pool", i)],
            )
            for i in range(stream_connections)
        ]
        self.stream_load = [0] * stream_connections
        self.serving = True  # optimistic until the first check says otherwise
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def usable(self) -> bool:
        return self.serving and self.channel.get_state(try_to_connect=True) not in _BAD_STATES

    async def check(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            self.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            self.serving = False
        return self.serving


class Upstream:
    """The addresses of one service, with health and round-robin selection."""

    def __init__(
        self,
        name: str,
        addresses: tuple[str, ...],
        max_message_bytes: int,
        *,
        max_streams: int,
        streams_per_connection: int,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``max_streams``: the most streams the gateway holds; ``streams_per_connection``: the upstream's
        HTTP/2 limit per connection (both sizes of the stream connections); ``credentials``: the
        internal hop's TLS (:func:`shared.rpc.tls.internal_channel_credentials`), None for plaintext."""
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
        ]
        self.name = name
        connections = max(1, math.ceil(max_streams / streams_per_connection))
        self._addresses = [_Address(a, options, connections, credentials) for a in addresses]
        self._turn = itertools.cycle(range(len(self._addresses)))
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        """True while at least one address is serving."""
        return any(a.serving for a in self._addresses)

    def pick(self, exclude: grpc.aio.Channel | None = None) -> grpc.aio.Channel:
        """The next usable channel (not ``exclude``), or the next one when none is usable."""
        return self._next_address(exclude).channel

    def pick_stream(self) -> tuple[grpc.aio.Channel, Callable[[], None]]:
        """A stream connection of the next usable address, the least loaded; call the second to release it."""
        address = self._next_address()
        index = min(range(len(address.stream_load)), key=address.stream_load.__getitem__)
        address.stream_load[index] += 1

        def release() -> None:
            address.stream_load[index] -= 1

        return address.stream_channels[index], release

    def _next_address(self, exclude: grpc.aio.Channel | None = None) -> _Address:
        first = next(self._turn)
        count = len(self._addresses)
        for step in range(count):
            candidate = self._addresses[(first + step) % count]
            if candidate.channel is not exclude and candidate.usable():
                return candidate
        return self._addresses[first]

    def start(self, on_change: Callable[[str, bool], Awaitable[None]], interval_s: float = 1.0) -> None:
        """Check every address every ``interval_s``; call ``on_change(name, serving)`` on changes."""
        self._task = asyncio.create_task(self._watch(on_change, interval_s), name=f"upstream-{self.name}")

    async def _watch(self, on_change: Callable[[str, bool], Awaitable[None]], interval_s: float) -> None:
        last: bool | None = None
        while True:
            results = await asyncio.gather(*(a.check() for a in self._addresses))
            now = any(results)
            if now != last:
                if last is not None:
                    _log.warning("upstream health changed", extra={"upstream": self.name, "serving": now})
                await on_change(self.name, now)
                last = now
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        """Stop checking and close every channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for address in self._addresses:
            for channel in (address.channel, *address.stream_channels):
                await channel.close()

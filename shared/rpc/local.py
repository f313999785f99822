"""Calls between roles of one process: the gateway hands a call to the service's own handler.

When the gateway and a service share a process (``python -m roles``), the
gateway's admission (API key, scope, rate limit, deadline, trace context,
consistency token, call gate) is followed by the service's handler itself: no
second gRPC hop, no identity signed and verified, no second HTTP/2 decode. The
handler is the one the service's port serves (decoding, the service's call
gate, its declared scope, the error mapping), given a :class:`LocalContext`
instead of a gRPC one. What the handler tells its context comes back to the
gateway as a remote call's answer would: trailing metadata, and a status as a
``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from shared.api.callers import Caller

__all__ = ["LocalContext", "LocalUnary"]

# A service's unary handler as its port serves it, without the service's own SERVER span: the
# gateway's span is the call's.
LocalUnary = Callable[[bytes, Any], Awaitable[bytes]]


class LocalContext:
    """What a service's handler asks of its call, answered for an in-process call.

    ``caller`` is the one the gateway authenticated (trusted: only code in this
    process makes a LocalContext); ``metadata`` what the gateway forwards (the
    caller's, with its newest consistency token); the deadline and peer are the
    gateway's call's (or, for the gateway's own key lookup, its own).
    """

    def __init__(
        self, caller: Caller, metadata: Sequence[tuple[str, str]], timeout: float | None, peer: str
    ) -> None:
        """``timeout``: seconds left of the call's deadline (None: none); ``peer``: the caller's address."""
        self.caller = caller
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._peer = peer
        self.trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def peer(self) -> str:
        return self._peer

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, Any]] = ()
    ) -> None:
        """End the call with a status: raised to the gateway as a remote call's would be."""
        raise grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*trailing_metadata),
            details,
        )

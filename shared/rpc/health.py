"""``grpc.health.v1.Health`` as every Strata process serves it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from shared.api.errors import Code, StrataError
from shared.rpc.handlers import abort_with, decode_request

__all__ = ["HealthService"]

# Health watches one process serves at once (they need no key, so no keyed limit applies).
_MAX_HEALTH_WATCHES = 256
_DOMAIN = health_pb2.DESCRIPTOR.package  # of the errors health answers


class HealthService:
    """``grpc.health.v1.Health`` (Check and Watch) for one server, requests decoded here.

    Replaces grpcio-health-checking's aio servicer for two reasons: it is
    registered with a deserializer, whose DecodeError grpc.aio answers with
    UNKNOWN naming the exception class (here: INVALID_ARGUMENT on ``request``,
    as for every Strata method); and its Watch streams through context.write,
    which the metrics interceptor (wrapping async generators) cannot wrap.
    Health stays unsigned and outside the drain gate: load balancers and the
    gateway ask it. List is not served (UNIMPLEMENTED), as before. At most
    256 Watch streams at once (RESOURCE_EXHAUSTED ``TOO_MANY_HEALTH_WATCHES``).
    """

    def __init__(self) -> None:
        self._status: dict[str, Any] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._final = False
        self._watchers = 0

    async def set(self, service: str, status: Any) -> None:
        """Report ``service``'s ServingStatus (ignored once shutting down)."""
        async with self._changed:
            if not self._final:
                self._status[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Turn every service NOT_SERVING for good."""
        async with self._changed:
            self._final = True
            self._status = dict.fromkeys(self._status, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._changed.notify_all()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving Check and Watch from raw request bytes."""
        serialize = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self._check, response_serializer=serialize),
                "Watch": grpc.unary_stream_rpc_method_handler(self._watch, response_serializer=serialize),
            },
        )

    async def _check(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        service = (await _health_request(raw, context)).service
        if service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=self._status[service])

    async def _watch(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = (await _health_request(raw, context)).service
        # Health needs no key, so its streams are capped apart from every keyed limit.
        if self._watchers >= _MAX_HEALTH_WATCHES:
            await abort_with(
                context,
                StrataError(
                    Code.RESOURCE_EXHAUSTED,
                    "TOO_MANY_HEALTH_WATCHES",
                    f"this process already serves {_MAX_HEALTH_WATCHES} health watches; use Check",
                    retry_delay_s=1.0,
                ),
                _DOMAIN,
            )
        self._watchers += 1
        try:
            last = None
            while True:
                # Sent outside the lock, so a slow watcher never holds up set().
                async with self._changed:
                    while (status := self._current(service)) == last:
                        await self._changed.wait()
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
        finally:
            self._watchers -= 1

    def _current(self, service: str) -> Any:
        return self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


async def _health_request(
    raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> health_pb2.HealthCheckRequest:
    try:
        return decode_request(health_pb2.HealthCheckRequest, raw)
    except StrataError as exc:
        await abort_with(context, exc, _DOMAIN)
        raise AssertionError("unreachable") from None

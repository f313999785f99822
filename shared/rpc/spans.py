"""RPC spans as the OpenTelemetry RPC conventions name and end them: SERVER spans continuing the
caller's W3C trace context, CLIENT spans injecting it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace

from shared.observability.telemetry import tracer

__all__ = ["end_rpc_span", "rpc_client_span", "rpc_server_span"]

# Server span status per the OpenTelemetry RPC conventions: only these codes
# are errors on the server side (NOT_FOUND, INVALID_ARGUMENT … are the
# caller's problem, not the server's).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


@contextmanager
def rpc_server_span(service: str, method: str, metadata: Any, peer: str = "") -> Iterator[trace.Span]:
    """A SERVER span named ``<service>/<method>`` continuing the caller's W3C trace context.

    The caller sets the final code with :func:`end_rpc_span`.
    """
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    parent = propagate.extract(carrier)
    attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if peer:
        attributes["network.peer.address"] = peer
    with tracer().start_as_current_span(
        f"{service}/{method}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


@contextmanager
def rpc_client_span(service: str, method: str, metadata: list[tuple[str, str]]) -> Iterator[trace.Span]:
    """A CLIENT span for a call to ``<service>/<method>``; injects its W3C context into ``metadata``."""
    with tracer().start_as_current_span(
        f"{service}/{method}",
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        metadata.extend(carrier.items())
        yield span


def end_rpc_span(span: trace.Span, code: grpc.StatusCode | None, *, client: bool = False) -> None:
    """Record the call's final status code on ``span``.

    Client spans count every non-OK code as an error; server spans only the
    codes that mean the server failed (the RPC conventions).
    """
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if (client and code != grpc.StatusCode.OK) or code in _SERVER_ERROR_CODES:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))

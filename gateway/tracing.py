"""The gateway's client spans: one per call it makes upstream, when tracing is on."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from opentelemetry import trace

from shared.observability.telemetry import tracing_on
from shared.rpc.spans import end_rpc_span, rpc_client_span

__all__ = ["end_span", "upstream_call_span"]


def upstream_call_span(
    service: str, method: str, metadata: list[tuple[str, str]]
) -> AbstractContextManager[Any]:
    """A CLIENT span for a call to ``<service>/<method>``, its W3C context added to ``metadata``.

    A no-op (yielding None) when this process does not trace.
    """
    return rpc_client_span(service, method, metadata) if tracing_on() else nullcontext()


def end_span(span: Any, code: grpc.StatusCode, *, client: bool = False) -> None:
    """Record ``code`` on ``span``; nothing when the span is a no-op's None."""
    if span is not None and isinstance(span, trace.Span):
        end_rpc_span(span, code, client=client)

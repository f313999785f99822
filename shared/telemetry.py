"""Telemetry wiring: OpenTelemetry SDK, instrumentation plugins and JSON logs.

Code elsewhere uses only the OpenTelemetry API (``trace.get_tracer``); this
module wires the SDK once per process from the standard ``OTEL_*`` variables.
Tracing is on when an OTLP endpoint or a traces exporter is configured; then
the asyncpg and Redis instrumentation plugins are installed (Postgres spans
get ``db.operation`` from :mod:`shared.dbspans`) and the server bootstrap
opens one SERVER span per call (:func:`rpc_server_span`, named
``<package.Service>/<Method>`` as the RPC conventions say). Sampling follows
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK reads them);
:func:`shared.settings.load_settings` has already rejected bad values of the
variables used here. Otherwise nothing is installed and the hot path pays
nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace

__all__ = [
    "configure_logging",
    "end_rpc_span",
    "rpc_client_span",
    "rpc_server_span",
    "setup_telemetry",
    "shutdown_telemetry",
    "tracing_enabled",
    "tracing_on",
    "untraced",
]

_enabled = False


def tracing_enabled(environ: dict[str, str] | None = None) -> bool:
    """True when the ``OTEL_*`` variables ask for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_telemetry(service_name: str, otlp_protocol: str = "grpc") -> bool:
    """Install the tracer provider and instrumentations for this process.

    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` overrides it;
    spans are exported over OTLP with ``otlp_protocol`` (``Settings.otlp_protocol``).
    Returns whether tracing is on. Safe to call more than once.
    """
    global _enabled
    if _enabled or not tracing_enabled():
        return _enabled
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from shared.dbspans import DatabaseOperations

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)  # its sampler: from OTEL_TRACES_SAMPLER
    provider.add_span_processor(DatabaseOperations())
    provider.add_span_processor(BatchSpanProcessor(_span_exporter(otlp_protocol)))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument()
    RedisInstrumentor().instrument()
    _enabled = True
    return True


def tracing_on() -> bool:
    """Whether :func:`setup_telemetry` turned tracing on in this process."""
    return _enabled


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
    with _tracer().start_as_current_span(
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
    with _tracer().start_as_current_span(
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


@contextmanager
def untraced() -> Iterator[None]:
    """No spans inside: for background work (polls, sweeps) that would flood traces with roots."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


@functools.cache
def _tracer() -> trace.Tracer:
    # Made once: get_tracer builds a new tracer (and scope) on every call. Before
    # the provider is installed this is a proxy that follows it once it is.
    return trace.get_tracer("strata.server")


def shutdown_telemetry() -> None:
    """Flush pending spans (called at process exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _span_exporter(protocol: str) -> Any:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids."""

    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in self._RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send this process's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

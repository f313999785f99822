"""Telemetry wiring: the OpenTelemetry SDK and its instrumentation plugins.

Code elsewhere uses only the OpenTelemetry API (``trace.get_tracer``); this
module wires the SDK once per process from the standard ``OTEL_*`` variables.
Tracing is on when an OTLP endpoint or a traces exporter is configured; then
the asyncpg and Redis instrumentation plugins are installed (Postgres spans
get ``db.operation`` from :mod:`shared.observability.dbspans`) and the server bootstrap
opens one SERVER span per call (:func:`shared.rpc.spans.rpc_server_span`, named
``<package.Service>/<Method>`` as the RPC conventions say). Sampling follows
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK reads them);
:func:`shared.config.settings.load_settings` has already rejected bad values of the
variables used here. Otherwise nothing is installed and the hot path pays
nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

__all__ = [
    "setup_telemetry",
    "shutdown_telemetry",
    "tracer",
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

    from shared.observability.dbspans import DatabaseOperations

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


@contextmanager
def untraced() -> Iterator[None]:
    """No spans inside: for background work (polls, sweeps) that would flood traces with roots."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


@functools.cache
def tracer() -> trace.Tracer:
    """Strata's tracer (a proxy until :func:`setup_telemetry` installs the provider)."""
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

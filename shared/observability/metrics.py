"""Prometheus metrics of one process, served on ``STRATA_<NAME>_METRICS_PORT``.

RPCs are counted and timed by a server interceptor, so the gateway's
generic proxy handler and every service's handlers are measured the same
way, with the names go-grpc-prometheus made common:
``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}`` and
the ``grpc_server_handling_seconds`` histogram, labelled by
``grpc_service`` and ``grpc_method``. The process's own figures (pool,
cache, calls in flight: the sources it publishes for admin) are read at
scrape time. Without a metrics port nothing here is installed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.cache.local import CACHE_COUNTERS

__all__ = ["Metrics"]

# From a cache hit (~100 µs) to a slow statement or a long stream.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of process ``component``: an interceptor to install, an HTTP endpoint to serve."""

    def __init__(self, component: str, figures: Mapping[str, Callable[[], Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = ("grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to sending its status.",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_FiguresCollector(component, figures))

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The server interceptor that counts and times every RPC."""
        return _RpcInterceptor(self)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``host:port`` from a background thread."""
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Record one finished RPC."""
        self.handled.labels(service, method, code.name).inc()
        self.latency.labels(service, method).observe(seconds)


class _FiguresCollector(Collector):
    """Exports the process's published figures when scraped."""

    def __init__(self, component: str, figures: Mapping[str, Callable[[], Any]]) -> None:
        self._component = component
        self._figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        values = {name: source() for name, source in self._figures.items()}
        labels = ["component"]
        inflight = GaugeMetricFamily("strata_calls_in_flight", "RPCs being handled now.", labels=labels)
        inflight.add_metric([self._component], float(values.get("calls_in_flight", 0)))
        yield inflight
        pool = values.get("pool")
        if isinstance(pool, dict):
            for name, meaning in (
                ("size", "Postgres connections open."),
                ("idle", "Postgres connections idle."),
                ("max_size", "Postgres connections allowed."),
                ("waiters", "Calls waiting for a Postgres connection."),
            ):
                gauge = GaugeMetricFamily(f"strata_pool_{name}", meaning, labels=labels)
                gauge.add_metric([self._component], float(pool.get(name, 0)))
                yield gauge
        cache = values.get("cache")
        if isinstance(cache, dict):
            for name in CACHE_COUNTERS:
                counter = CounterMetricFamily(
                    f"strata_cache_{name}", f"Cache {name.replace('_', ' ')} since start.", labels=labels
                )
                counter.add_metric([self._component], float(cache.get(name, 0)))
                yield counter
            entries = GaugeMetricFamily(
                "strata_cache_local_entries", "Entries in the local tier.", labels=labels
            )
            entries.add_metric([self._component], float(cache.get("local_entries", 0)))
            yield entries


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if code in (None, 0) else grpc.StatusCode.UNKNOWN


class _RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        metrics = self._metrics

        def finish(started: float, context: Any, error: BaseException | None) -> None:
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif error is not None and not isinstance(error, grpc.aio.AbortError):
                code = grpc.StatusCode.UNKNOWN
            else:
                code = _code_of(context)
            metrics.observe(service, method, code, time.perf_counter() - started)

        def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: Any) -> Any:
                metrics.started.labels(service, method).inc()
                started = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    finish(started, context, exc)
                    raise
                finish(started, context, None)
                return response

            return wrapped

        def stream_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                metrics.started.labels(service, method).inc()
                started = time.perf_counter()
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    finish(
                        started, context, asyncio.CancelledError() if isinstance(exc, GeneratorExit) else exc
                    )
                    raise
                finish(started, context, None)

            return wrapped

        kinds = (
            (handler.unary_unary, unary_response, grpc.unary_unary_rpc_method_handler),
            (handler.stream_unary, unary_response, grpc.stream_unary_rpc_method_handler),
            (handler.unary_stream, stream_response, grpc.unary_stream_rpc_method_handler),
            (handler.stream_stream, stream_response, grpc.stream_stream_rpc_method_handler),
        )
        for behavior, wrap, make in kinds:
            if behavior is not None:
                return make(
                    wrap(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

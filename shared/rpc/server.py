"""One server bootstrap for every Strata process.

:class:`StrataServer` wires servicers into a ``grpc.aio`` server together with
what every process needs: ``grpc.health.v1``, reflection, message-size limits,
request decoding that answers INVALID_ARGUMENT for undecodable bytes, the one
error mapping of :mod:`shared.api.errors`, optional tracing, and a SIGTERM path
(health NOT_SERVING → shutdown hooks → drain in-flight calls → exit).

Handlers are registered from the service descriptors (:mod:`shared.rpc.handlers`),
the call gate is :mod:`shared.rpc.callgate` and health :mod:`shared.rpc.health`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import uvloop
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health_pb2

from shared.cache.redisclient import open_redis
from shared.config.settings import ConfigError, Settings, load_settings, require_internal_secret
from shared.observability.logs import configure_logging
from shared.observability.metrics import Metrics
from shared.observability.stats import ProcessReporter
from shared.observability.telemetry import setup_telemetry, shutdown_telemetry
from shared.rpc.callgate import CallGate
from shared.rpc.handlers import Admission, service_handler
from shared.rpc.health import HealthService
from shared.rpc.local import LocalUnary
from shared.rpc.reflection import add_reflection
from shared.rpc.tls import internal_server_credentials, public_server_credentials

__all__ = ["ShutdownHook", "StrataServer", "run_service"]

ShutdownHook = Callable[[], Awaitable[None]]
_log = logging.getLogger(__name__)
# Longest one shutdown or after-drain hook may take before it is abandoned.
_HOOK_TIMEOUT_S = 10.0


class StrataServer:
    """A gRPC server with Strata's common behaviour.

    Example::

        server = StrataServer(settings, "kv")
        server.add_servicer(servicer, kv_pb2.DESCRIPTOR.services_by_name["KvService"])
        server.on_shutdown(pool.close)
        await server.serve(settings.kv_port)
    """

    def __init__(self, settings: Settings, name: str, *, public: bool = False) -> None:
        self._settings = settings
        self.name = name
        self._public = public
        limit = settings.max_message_bytes
        # The process's own figures (pool, cache, calls in flight): published
        # to Redis for admin and exported to Prometheus when a port is set.
        self._figures: dict[str, Callable[[], Any]] = {
            "calls_in_flight": lambda: self._gate.inflight,
            "calls_refused_overloaded": lambda: self._gate.refused,
        }
        metrics_port = settings.metrics_port_of(name)
        self._metrics = Metrics(name, self._figures) if metrics_port else None
        self._server = grpc.aio.server(
            interceptors=[self._metrics.interceptor()] if self._metrics is not None else None,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Streams one client connection may have open at once (HTTP/2 SETTINGS):
                # the rest wait on the client's side, not in this process.
                ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
                # Off, so a port taken by another server fails the start; on where several
                # processes of this one serve one port (the gateway's replicas).
                ("grpc.so_reuseport", int(settings.processes_of(name) > 1)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        self._health = HealthService()
        self._server.add_generic_rpc_handlers((self._health.handler(),))
        self._service_names: list[str] = []
        self._local: dict[str, LocalUnary] = {}
        self._hooks: list[ShutdownHook] = []
        self._closers: list[ShutdownHook] = []
        self._stopping = asyncio.Event()
        self._gate = CallGate(settings.max_calls_in_flight)
        self._secret = require_internal_secret(settings)
        self.port = 0
        self.reporter: ProcessReporter | None = None
        if settings.redis_url:
            self.reporter = ProcessReporter(
                open_redis(settings.redis_url), name, settings.stats_interval_s, self._figures
            )

    def add_servicer(self, servicer: object, service: _descriptor.ServiceDescriptor) -> None:
        """Serve every method of ``service`` from the same-named coroutine of ``servicer``; each call
        needs the scope its method declares in the protos.

        Unary methods are ``async def Method(request, context) -> response``;
        server-streaming ones are async generators yielding responses;
        client-streaming ones are ``async def Method(requests, context) -> response``
        where ``requests`` is an async iterator of decoded messages.
        """

        def admission(method: _descriptor.MethodDescriptor) -> Admission:
            return Admission(self._gate, self._secret, method, self._settings.identity_max_age_s)

        handler = service_handler(servicer, service, admission, self._local)
        self._server.add_generic_rpc_handlers((handler,))
        self._service_names.append(service.full_name)

    @property
    def local_handlers(self) -> dict[str, LocalUnary]:
        """Path → the unary handlers of this server's services, for a gateway in this process
        (:mod:`shared.rpc.local`)."""
        return self._local

    def add_generic_handler(self, handler: grpc.GenericRpcHandler, service_names: list[str]) -> None:
        """Serve ``service_names`` from ``handler`` (the gateway's proxy), with reflection and health."""
        self._server.add_generic_rpc_handlers((handler,))
        self._service_names.extend(service_names)

    @property
    def gate(self) -> CallGate:
        """Admission of new calls: closed while draining (for handlers not added by add_servicer)."""
        return self._gate

    async def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` ("" for the whole server) as SERVING or NOT_SERVING."""
        if not self._gate.closed:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._health.set(service, status)

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Run ``hook`` at shutdown, after health turns NOT_SERVING, while calls drain."""
        self._hooks.append(hook)

    def after_drain(self, hook: ShutdownHook) -> None:
        """Run ``hook`` once every call has finished (close pools and clients here)."""
        self._closers.append(hook)

    def report(self, name: str, source: Callable[[], Any]) -> None:
        """Publish ``source()`` as ``name`` among this process's figures (Redis for admin, Prometheus)."""
        self._figures[name] = source

    async def start(self, port: int) -> int:
        """Bind ``host:port`` (0 picks a free port), start serving, return the port."""
        add_reflection(self._server, self._service_names)
        address = f"{self._settings.host}:{port}"
        credentials = (
            public_server_credentials(self._settings)
            if self._public
            else internal_server_credentials(self._settings)
        )
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._settings.host}:{port}")
        await self._server.start()
        for name in ("", *self._service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.reporter is not None:
            self.reporter.start()
            self.after_drain(self.reporter.close)
        if self._metrics is not None:
            self._metrics.serve(self._settings.metrics_port_of(self.name), self._settings.host)
        _log.info("serving", extra={"service": self.name, "port": self.port})
        return self.port

    async def serve(self, port: int) -> None:
        """Start on ``port`` and serve until SIGTERM/SIGINT, then shut down gracefully."""
        await self.start(port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        # Tells a parent process (launcher, tests) that the port is bound.
        print(f"READY {self.name} {self._settings.host}:{self.port}", flush=True)
        await self._stopping.wait()
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`serve` to shut down, as SIGTERM does."""
        self._stopping.set()

    async def stop(self, grace: float | None = None) -> None:
        """Shut down gracefully, waiting up to ``grace`` s (default: the setting) for calls to finish.

        Health turns NOT_SERVING; new calls are refused with UNAVAILABLE
        (reason SHUTTING_DOWN, safe to retry elsewhere) while the server still
        runs, so no accepted call is cancelled unstarted; the shutdown hooks
        run (ending watch streams); in-flight calls finish; then the server
        stops and the after-drain hooks close pools and clients.
        """
        grace_s = self._settings.shutdown_grace_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        self._gate.close()
        await _run_hooks(self._hooks)
        drained = await self._gate.wait_idle(grace_s)
        await self._server.stop(0.5)
        await _run_hooks(self._closers)
        _log.info("stopped", extra={"service": self.name, "drained": drained})


def run_service(name: str, build: Callable[[Settings], Awaitable[StrataServer]]) -> None:
    """The whole life of a service process: settings, logs, telemetry, serve until SIGTERM.

    ``build`` opens what the service needs and returns its server; the port
    is the ``STRATA_<NAME>_PORT`` setting. A bad setting exits with code 2.
    """
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"strata-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(name, settings.log_level)
    setup_telemetry(f"strata-{name}", settings.otlp_protocol)

    async def serve() -> None:
        server = await build(settings)
        await server.serve(settings.port_of(name))

    try:
        uvloop.run(serve())
    finally:
        shutdown_telemetry()


async def _run_hooks(hooks: list[ShutdownHook]) -> None:
    for hook in hooks:
        try:
            # A stuck hook must not keep the process from exiting.
            await asyncio.wait_for(hook(), _HOOK_TIMEOUT_S)
        except TimeoutError:
            _log.error("shutdown hook timed out", extra={"hook": getattr(hook, "__qualname__", repr(hook))})
        except Exception:
            _log.exception("shutdown hook failed")

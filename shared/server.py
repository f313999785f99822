"""One server bootstrap for every Strata process.

:class:`StrataServer` wires servicers into a ``grpc.aio`` server together with
what every process needs: ``grpc.health.v1``, reflection, message-size limits,
request decoding that answers INVALID_ARGUMENT for undecodable bytes, the one
error mapping of :mod:`shared.errors`, optional tracing, and a SIGTERM path
(health NOT_SERVING → shutdown hooks → drain in-flight calls → exit).

Handlers are registered from the service descriptors, with raw bytes in and
out, so decoding happens here once and a malformed message never reaches a
servicer.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import uvloop
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

from shared.consistency import TOKEN_KEY, begin_call, format_lsn
from shared.errors import FieldViolation, StrataError, from_exception, invalid_argument
from shared.identity import set_current_caller, verify_caller
from shared.metrics import Metrics
from shared.redisclient import open_redis
from shared.reflection import add_reflection
from shared.settings import ConfigError, Settings, load_settings, require_internal_secret
from shared.stats import ProcessReporter
from shared.telemetry import (
    configure_logging,
    end_rpc_span,
    rpc_server_span,
    setup_telemetry,
    shutdown_telemetry,
    tracing_on,
)
from shared.tls import internal_server_credentials, public_server_credentials
from shared.wireformat import invalid_utf8_field

__all__ = ["CallGate", "ShutdownHook", "StrataServer", "run_service"]

ShutdownHook = Callable[[], Awaitable[None]]
_M = TypeVar("_M", bound=_message.Message)
_log = logging.getLogger(__name__)
# Longest one shutdown or after-drain hook may take before it is abandoned.
_HOOK_TIMEOUT_S = 10.0
# Health watches one process serves at once (they need no key, so no keyed limit applies).
_MAX_HEALTH_WATCHES = 256


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
        self._health = _Health()
        self._server.add_generic_rpc_handlers((self._health.handler(),))
        self._service_names: list[str] = []
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
        """Serve every method of ``service`` from the same-named coroutine of ``servicer``.

        Unary methods are ``async def Method(request, context) -> response``;
        server-streaming ones are async generators yielding responses;
        client-streaming ones are ``async def Method(requests, context) -> response``
        where ``requests`` is an async iterator of decoded messages.
        """
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            impl = getattr(servicer, method.name)
            request_type = message_factory.GetMessageClass(method.input_type)
            if method.client_streaming and method.server_streaming:
                raise NotImplementedError(f"bidirectional streaming is not supported: {method.full_name}")
            if method.client_streaming:
                upload = _client_stream_handler(impl, request_type, self._admission(service, method))
                if tracing_on():
                    upload = _traced_unary(upload, service.full_name, method.name)
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(upload)
            elif method.server_streaming:
                stream = _stream_handler(impl, request_type, self._admission(service, method))
                if tracing_on():
                    stream = _traced_stream(stream, service.full_name, method.name)
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(stream)
            else:
                unary = _unary_handler(impl, request_type, self._admission(service, method))
                if tracing_on():
                    unary = _traced_unary(unary, service.full_name, method.name)
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        self._service_names.append(service.full_name)

    def _admission(
        self, service: _descriptor.ServiceDescriptor, method: _descriptor.MethodDescriptor
    ) -> _Admission:
        return _Admission(
            self._gate, self._secret, f"/{service.full_name}/{method.name}", self._settings.identity_max_age_s
        )

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


class _Admission:
    """Lets a call of one method in: the server is not draining and the caller is signed for it."""

    def __init__(self, gate: CallGate, secret: bytes, full_method: str, max_age_s: float) -> None:
        self.gate = gate
        self._secret = secret
        self._method = full_method
        self._max_age_s = max_age_s

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], body: bytes | None) -> None:
        """Enter the gate and bind the caller verified for request ``body`` (None: a client stream);
        raises StrataError (and leaves) otherwise."""
        self.gate.enter()
        try:
            metadata = context.invocation_metadata() or ()
            caller = verify_caller(self._secret, self._method, metadata, body=body, max_age_s=self._max_age_s)
            set_current_caller(caller)
        except StrataError:
            self.gate.leave()
            raise


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
                grpc.StatusCode.UNAVAILABLE,
                "SHUTTING_DOWN",
                "the server is shutting down; retry on another instance",
                retry_delay_s=0.1,
            )
        if self.inflight >= self.limit:
            self.refused += 1
            raise StrataError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
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


def _decode(request_type: type[_M], raw: bytes) -> _M:
    """``raw`` parsed as ``request_type``; INVALID_ARGUMENT naming the field at fault otherwise.

    The parser says only that it failed: a string field that is not valid
    UTF-8 is found by walking the bytes again and named; anything else
    malformed names the whole ``request``.
    """
    request = request_type()
    try:
        request.ParseFromString(raw)
    except _message.DecodeError:
        violation = invalid_utf8_field(request_type, raw) or FieldViolation(
            "request", "the message cannot be decoded (malformed bytes)"
        )
        raise invalid_argument([violation]) from None
    return request


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    error = from_exception(exc)
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


class _Health:
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
            await _abort(
                context,
                StrataError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TOO_MANY_HEALTH_WATCHES",
                    f"this process already serves {_MAX_HEALTH_WATCHES} health watches; use Check",
                    retry_delay_s=1.0,
                ),
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
        return _decode(health_pb2.HealthCheckRequest, raw)
    except StrataError as exc:
        await _abort(context, exc)
        raise AssertionError("unreachable") from None


def _unary_handler(
    impl: Callable[..., Awaitable[_message.Message]],
    request_type: type[_message.Message],
    admission: _Admission,
) -> UnaryHandler:
    return _answering_once(impl, lambda raw: _decode(request_type, raw), admission, signed_body=True)


def _client_stream_handler(
    impl: Callable[..., Awaitable[_message.Message]],
    request_type: type[_message.Message],
    admission: _Admission,
) -> UnaryHandler:
    async def decoded(raw_requests: AsyncIterator[bytes]) -> AsyncIterator[_message.Message]:
        async for raw in raw_requests:
            yield _decode(request_type, raw)

    return _answering_once(impl, decoded, admission, signed_body=False)


def _answering_once(
    impl: Callable[..., Awaitable[_message.Message]],
    requests: Callable[[Any], Any],
    admission: _Admission,
    *,
    signed_body: bool,
) -> UnaryHandler:
    """A handler with one response: admit, hand ``requests(raw)`` to ``impl``, map errors to statuses.

    ``signed_body``: ``raw`` is the request's bytes, which the identity is checked against (else a stream).
    """
    gate = admission.gate

    async def handle(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            admission.admit(context, raw if signed_body else None)
        except StrataError as exc:
            await _abort(context, exc)
        try:
            tokens = begin_call(context.invocation_metadata())
            response = await impl(requests(raw), context)
            if tokens.committed:
                context.set_trailing_metadata(((TOKEN_KEY, format_lsn(tokens.committed)),))
            return response.SerializeToString()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from None
        finally:
            gate.leave()

    return handle


def _stream_handler(
    impl: Callable[..., AsyncIterator[_message.Message]],
    request_type: type[_message.Message],
    admission: _Admission,
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    gate = admission.gate

    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            admission.admit(context, raw)
        except StrataError as exc:
            await _abort(context, exc)
        try:
            begin_call(context.invocation_metadata())
            async for response in impl(_decode(request_type, raw), context):
                yield response.SerializeToString()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            gate.leave()

    return handle


UnaryHandler = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[bytes]]
StreamHandler = Callable[[bytes, "grpc.aio.ServicerContext[Any, Any]"], AsyncIterator[bytes]]


def _traced_unary(handle: UnaryHandler, service: str, method: str) -> UnaryHandler:
    async def traced(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with rpc_server_span(service, method, context.invocation_metadata(), context.peer()) as span:
            try:
                result = await handle(raw, context)
            except grpc.aio.AbortError:
                end_rpc_span(span, context.code())
                raise
            except asyncio.CancelledError:
                end_rpc_span(span, grpc.StatusCode.CANCELLED)
                raise
            end_rpc_span(span, grpc.StatusCode.OK)
            return result

    return traced


def _traced_stream(handle: StreamHandler, service: str, method: str) -> StreamHandler:
    async def traced(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        with rpc_server_span(service, method, context.invocation_metadata(), context.peer()) as span:
            try:
                async for message in handle(raw, context):
                    yield message
            except grpc.aio.AbortError:
                end_rpc_span(span, context.code())
                raise
            except (asyncio.CancelledError, GeneratorExit):
                end_rpc_span(span, grpc.StatusCode.CANCELLED)
                raise
            end_rpc_span(span, grpc.StatusCode.OK)

    return traced

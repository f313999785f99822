"""The gateway's one generic handler: authenticate, authorise, limit, forward raw bytes.

Messages are never decoded: request and response bytes pass through as they
are, so the gateway's cost does not depend on message size or schema. What
travels with a call:

- the caller's deadline, as what is left of it;
- the caller's metadata, minus ``authorization``, anything ``x-strata-*``
  (only the gateway may sign identities) and hop-by-hop headers;
- the identity resolved from the API key, signed for that very method;
- the caller's newest consistency token (see gateway.consistency);
- the W3C trace context of the gateway's client span when the gateway traces,
  else the caller's own ``traceparent``/``tracestate``, unchanged.

Status codes, messages and trailing metadata (``grpc-status-details-bin``
included) come back unchanged; cancellation propagates both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2

from gateway.auth import FailedAttempts, KeyResolver, bearer_token, missing_scope, peer_host
from gateway.consistency import CallerTokens
from gateway.ratelimit import RateLimiter
from gateway.routes import Route
from gateway.streams import OpenStream, OpenStreams
from gateway.tracing import end_span, upstream_call_span
from gateway.upstreams import Upstream
from shared.api.callers import Caller
from shared.api.errors import DETAILS_KEY, Code, StrataError
from shared.observability.telemetry import tracing_on
from shared.rpc.callgate import CallGate
from shared.rpc.handlers import Context, grpc_code
from shared.rpc.identity import INTERNAL_PREFIX, sign_caller
from shared.rpc.local import LocalContext, LocalUnary
from shared.rpc.spans import rpc_server_span

__all__ = ["Proxy"]

# How much of a refused client stream is still read before answering (see _discard).
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
_DISCARD_LIMIT_S = 5.0
# Never forwarded: the caller's credentials (the gateway forwards a signed identity
# instead), the hop-by-hop headers of RFC 9110 section 7.6.1 and RFC 7230 section 6.1
# (they describe the caller's connection, not the call), and what the gateway's own
# channel sets for its hop (user agent, content type; deadline and encodings are
# grpc-* names, never forwarded either: see _forwardable).
_DROPPED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "proxy-authenticate",
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "user-agent",
        "content-type",
    }
)
# The caller's W3C trace context: replaced by the client span's when the gateway
# traces; passed on unchanged when it does not, so the service joins the caller's trace.
_DROPPED_WHEN_TRACING = _DROPPED | {"traceparent", "tracestate"}


class Proxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Routes every known method to its upstream; unknown methods are UNIMPLEMENTED."""

    def __init__(
        self,
        routes: dict[str, Route],
        upstreams: dict[str, Upstream],
        keys: KeyResolver,
        limiter: RateLimiter,
        secret: bytes,
        gate: CallGate,
        streams: OpenStreams,
        failures: FailedAttempts,
        local: Mapping[str, LocalUnary] | None = None,
    ) -> None:
        """``local``: the unary handlers of services in this process, by path; their calls are
        handed to them in-process (:mod:`shared.rpc.local`) instead of forwarded."""
        self._keys = keys
        self._local = dict(local or {})
        self._streams = streams
        self._failures = failures
        self._limiter = limiter
        self._secret = secret
        self._gate = gate
        self._upstreams = upstreams
        self._tokens = CallerTokens()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {
            path: self._handler(route) for path, route in routes.items()
        }

    def _handler(self, route: Route) -> grpc.RpcMethodHandler:
        if route.client_streaming:
            return grpc.stream_unary_rpc_method_handler(self._upload(route))
        if route.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._stream(route))
        local = self._local.get(route.path)
        if local is not None:
            return grpc.unary_unary_rpc_method_handler(self._in_process(route, local))
        return grpc.unary_unary_rpc_method_handler(self._unary(route))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    async def _admit(
        self, route: Route, context: Context, request: bytes | None, *, sign: bool = True
    ) -> _Admitted:
        """What to forward once the caller may make this call; a server stream is counted in.

        The identity is signed for ``request``, the bytes forwarded (None: a client stream), unless
        the call stays in this process (``sign`` False).
        """
        self._gate.enter()
        try:
            incoming: Sequence[tuple[str, Any]] = context.invocation_metadata() or ()
            caller, token = await self._authenticate(incoming, context)
            refused = missing_scope(caller, route.scope)
            if refused is not None:
                raise refused
            await self._limiter.take(caller.key_id)
            stream = self._streams.open(token, caller, route.scope) if route.server_streaming else None
        except BaseException:
            self._gate.leave()
            raise
        forwarded = _forwardable(incoming)
        if sign:
            forwarded.extend(sign_caller(self._secret, route.path, caller, body=request))
        return _Admitted(self._tokens.attach(caller.key_id, forwarded), caller, stream)

    async def _authenticate(
        self, incoming: Sequence[tuple[str, Any]], context: Context
    ) -> tuple[Caller, str]:
        """The caller of the call's key, and its token; a peer that keeps failing is refused first.

        A key known good skips the per-address check (and the peer's address is not even read).
        """
        try:
            token = bearer_token(incoming)
            if not self._keys.known_good(token):
                self._failures.check(peer_host(context.peer() or ""))
            return await self._keys.resolve(token), token
        except StrataError as exc:
            if exc.code == Code.UNAUTHENTICATED:
                self._failures.failed(peer_host(context.peer() or ""))
            raise

    async def _admitted(
        self,
        route: Route,
        context: Context,
        server_span: Any,
        request: bytes | None,
        requests: AsyncIterator[bytes] | None = None,
        *,
        sign: bool = True,
    ) -> _Admitted:
        """:meth:`_admit`, answering the caller with the refusal when there is one.

        ``requests``, a client stream, is read on (bounded) before refusing: see :func:`_discard`.
        """
        try:
            return await self._admit(route, context, request, sign=sign)
        except StrataError as exc:
            if requests is not None:
                await _discard(requests)
            await _refuse(exc, route, context, server_span)
            raise AssertionError("unreachable") from None

    def _server_span(self, route: Route, context: Context) -> AbstractContextManager[Any]:
        if not tracing_on():
            return nullcontext()
        return rpc_server_span(route.service, route.method, context.invocation_metadata(), context.peer())

    def _client_span(self, route: Route, metadata: list[tuple[str, str]]) -> AbstractContextManager[Any]:
        return upstream_call_span(route.service, route.method, metadata)

    def _unary(self, route: Route) -> Any:
        upstream = self._upstreams[route.upstream]

        async def forward(request: bytes, context: Context) -> bytes:
            with self._server_span(route, context) as server_span:
                metadata, caller, _ = await self._admitted(route, context, server_span, request)
                try:
                    with self._client_span(route, metadata) as client_span:
                        try:
                            response, trailing = await _call_unary(
                                upstream, route, request, metadata, context
                            )
                        except grpc.aio.AioRpcError as exc:
                            end_span(client_span, exc.code(), client=True)
                            raise
                        end_span(client_span, grpc.StatusCode.OK, client=True)
                except grpc.aio.AioRpcError as exc:
                    await _pass_back(exc, context, server_span)
                finally:
                    self._gate.leave()
                self._tokens.observe(caller.key_id, trailing)
                context.set_trailing_metadata(tuple(trailing or ()))
                end_span(server_span, grpc.StatusCode.OK)
                return response

        return forward

    def _in_process(self, route: Route, handler: LocalUnary) -> Any:
        """A unary call of a service in this process: admitted here, then its handler directly."""

        async def hand_over(request: bytes, context: Context) -> bytes:
            with self._server_span(route, context) as server_span:
                metadata, caller, _ = await self._admitted(route, context, server_span, request, sign=False)
                local = LocalContext(caller, metadata, context.time_remaining(), context.peer())
                try:
                    # The caller's deadline bounds the handler as it bounds a forwarded call.
                    async with asyncio.timeout(context.time_remaining()):
                        response = await handler(request, local)
                except TimeoutError:
                    end_span(server_span, grpc.StatusCode.DEADLINE_EXCEEDED)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                except grpc.aio.AioRpcError as exc:
                    await _pass_back(exc, context, server_span)
                finally:
                    self._gate.leave()
                self._tokens.observe(caller.key_id, local.trailing)
                context.set_trailing_metadata(local.trailing)
                end_span(server_span, grpc.StatusCode.OK)
                return response

        return hand_over

    def _stream(self, route: Route) -> Any:
        upstream = self._upstreams[route.upstream]

        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            with self._server_span(route, context) as server_span:
                metadata, caller, stream = await self._admitted(route, context, server_span, request)
                assert stream is not None
                channel, release = upstream.pick_stream()
                call = None
                trailing = None
                try:
                    with self._client_span(route, metadata) as client_span:
                        call = channel.unary_stream(
                            route.path, request_serializer=None, response_deserializer=None
                        )(request, metadata=metadata, timeout=context.time_remaining())
                        try:
                            async for message in _until_ended(call, stream):
                                yield message
                            trailing = await call.trailing_metadata()
                        except grpc.aio.AioRpcError as exc:
                            end_span(client_span, exc.code(), client=True)
                            raise
                        except StrataError as exc:
                            end_span(client_span, grpc.StatusCode.CANCELLED, client=True)
                            await _refuse(exc, route, context, server_span)
                        end_span(client_span, grpc.StatusCode.OK, client=True)
                except grpc.aio.AioRpcError as exc:
                    await _pass_back(exc, context, server_span)
                finally:
                    if call is not None:
                        call.cancel()  # the caller went away, or we are done: free the upstream stream
                    release()
                    self._streams.close(stream)
                    self._gate.leave()
                if trailing:
                    self._tokens.observe(caller.key_id, trailing)
                    context.set_trailing_metadata(tuple(trailing or ()))
                end_span(server_span, grpc.StatusCode.OK)

        return forward

    def _upload(self, route: Route) -> Any:
        upstream = self._upstreams[route.upstream]

        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            with self._server_span(route, context) as server_span:
                metadata, caller, _ = await self._admitted(route, context, server_span, None, requests)
                call = None
                try:
                    with self._client_span(route, metadata) as client_span:
                        # The caller's messages flow to the upstream as they arrive; no retry
                        # on another address: a stream already sent cannot be replayed.
                        call = upstream.pick().stream_unary(
                            route.path, request_serializer=None, response_deserializer=None
                        )(requests, metadata=metadata, timeout=context.time_remaining())
                        try:
                            response: bytes = await call
                            trailing = await call.trailing_metadata()
                        except grpc.aio.AioRpcError as exc:
                            end_span(client_span, exc.code(), client=True)
                            raise
                        end_span(client_span, grpc.StatusCode.OK, client=True)
                except grpc.aio.AioRpcError as exc:
                    await _pass_back(exc, context, server_span)
                finally:
                    if call is not None:
                        call.cancel()  # the caller went away: stop the upstream call (no-op once done)
                    self._gate.leave()
                self._tokens.observe(caller.key_id, trailing)
                context.set_trailing_metadata(tuple(trailing or ()))
                end_span(server_span, grpc.StatusCode.OK)
                return response

        return forward


class _Admitted(NamedTuple):
    metadata: list[tuple[str, str]]  # to forward, the signed identity included (when signed)
    caller: Caller
    stream: OpenStream | None  # a server stream's place among the open ones


async def _until_ended(call: Any, stream: OpenStream) -> AsyncIterator[bytes]:
    """The upstream stream's messages until it ends, or until ``stream`` must end (its reason raised)."""
    ended = asyncio.ensure_future(stream.ended.wait())
    messages = call.__aiter__()
    following: asyncio.Future[bytes] | None = None
    try:
        while True:
            following = asyncio.ensure_future(messages.__anext__())
            await asyncio.wait((following, ended), return_when=asyncio.FIRST_COMPLETED)
            if stream.reason is not None:
                raise stream.reason.with_traceback(None)  # may be shared: a re-raise would grow it
            try:
                message = following.result()
            except StopAsyncIteration:
                return
            yield message
    finally:
        ended.cancel()
        if following is not None:
            following.cancel()


async def _refuse(exc: StrataError, route: Route, context: Context, server_span: Any) -> None:
    """Answer the caller with the gateway's own refusal, in the domain of the service it called."""
    end_span(server_span, grpc_code(exc.code))
    await context.abort(
        grpc_code(exc.code), exc.message, trailing_metadata=exc.trailing_metadata(route.domain)
    )


# One multicallable per upstream channel and method, made once: building one per call is
# measurable at gateway rates. Channels live as long as the process.
_UNARY_CALLABLES: dict[tuple[grpc.aio.Channel, str], grpc.aio.UnaryUnaryMultiCallable] = {}


def _unary_callable(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
    made = _UNARY_CALLABLES.get((channel, path))
    if made is None:
        made = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        _UNARY_CALLABLES[(channel, path)] = made
    return made


async def _call_unary(
    upstream: Upstream, route: Route, request: bytes, metadata: list[tuple[str, str]], context: Context
) -> tuple[bytes, Any]:
    """Forward one unary call; retry once on another address if the first could not be reached."""
    channel = upstream.pick()
    for attempt in (1, 2):
        call = _unary_callable(channel, route.path)(
            request, metadata=metadata, timeout=context.time_remaining()
        )
        try:
            response: bytes = await call
            return response, await call.trailing_metadata()
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            if attempt == 2 or not never_reached(exc):
                raise
            channel = upstream.pick(exclude=channel)
    raise AssertionError("unreachable")


async def _discard(requests: AsyncIterator[bytes]) -> None:
    """Read (a bounded part of) what a refused caller is still sending before answering it.

    A grpc-python asyncio client still writing when the answer comes can
    report INTERNAL ("Internal error from Core") instead of the answer
    (grpc/grpc#36066). BackupService/Restore does the same before refusing
    an upload, so its answer comes back after the caller's last message.
    """
    read = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_DISCARD_LIMIT_S):
            async for message in requests:
                read += len(message)
                if read > _DISCARD_LIMIT_BYTES:
                    return


async def _pass_back(exc: grpc.aio.AioRpcError, context: Context, server_span: Any) -> None:
    """Answer the caller with the upstream's status, message and trailing metadata, unchanged."""
    end_span(server_span, exc.code())
    await context.abort(
        exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ())
    )


# grpc's words for "no connection could be made": the call never left the gateway.
_NOT_CONNECTED = ("failed to connect to all addresses", "Connection refused")


def never_reached(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the upstream certainly did not run the call (so another address may)."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    for key, value in exc.trailing_metadata() or ():
        if key == DETAILS_KEY:
            # A draining service refuses before running anything; any other
            # answer with details came from a handler that may have run.
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            return any(d.Unpack(info) and info.reason == "SHUTTING_DOWN" for d in status.details)
    # No details: grpc itself answered. Only a connection that was never made
    # proves the call was not sent; one that broke mid-call ("Socket closed",
    # "Connection reset") may have run the handler, and a write must not run twice.
    return (exc.details() or "").startswith(_NOT_CONNECTED)


def _forwardable(incoming: Sequence[tuple[str, Any]]) -> list[tuple[str, str]]:
    """The caller's metadata the upstream may see: no credentials, identities or hop-by-hop headers.

    Nor ``grpc-*``: the protocol reserves those names, and the gateway's own
    channel sets the ones that describe its hop.
    """
    dropped = _DROPPED_WHEN_TRACING if tracing_on() else _DROPPED
    return [
        (key, value)
        for key, value in incoming
        if key not in dropped and not key.startswith((INTERNAL_PREFIX, ":", "grpc-"))
    ]

"""gRPC method handlers from servicer coroutines: admission, decoding, errors and spans, once.

Handlers take raw bytes and return them, so a request is decoded here once
(INVALID_ARGUMENT naming the field at fault for undecodable bytes) and a
malformed message never reaches a servicer; every exception leaves as the one
status :mod:`shared.api.errors` maps it to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import message_factory

from shared.api.callers import require_scope, set_current_caller
from shared.api.errors import Code, FieldViolation, StrataError, from_exception, invalid_argument
from shared.observability.telemetry import tracing_on
from shared.rpc.callgate import CallGate
from shared.rpc.contract import error_domain, required_scope
from shared.rpc.identity import verify_caller
from shared.rpc.local import LocalContext, LocalUnary
from shared.rpc.spans import end_rpc_span, rpc_server_span
from shared.rpc.wireformat import invalid_utf8_field
from shared.storage.consistency import TOKEN_KEY, begin_call, format_lsn

__all__ = ["Admission", "Context", "abort_with", "decode_request", "grpc_code", "service_handler"]

_M = TypeVar("_M", bound=_message.Message)
# What a servicer coroutine is called with beside its request (a LocalContext in-process).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
UnaryHandler = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[bytes]]
StreamHandler = Callable[[bytes, "grpc.aio.ServicerContext[Any, Any]"], AsyncIterator[bytes]]
_GRPC_CODES = {Code[status.name]: status for status in grpc.StatusCode}


def service_handler(
    servicer: object,
    service: _descriptor.ServiceDescriptor,
    admission: Callable[[_descriptor.MethodDescriptor], Admission],
    local: dict[str, LocalUnary] | None = None,
) -> grpc.GenericRpcHandler:
    """Every method of ``service`` served by the same-named coroutine of ``servicer``, each call let in
    by ``admission(method)``; spans when tracing is on. Each unary method's handler, untraced, is
    also put in ``local`` by its path, for calls from this process's gateway."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        request_type = message_factory.GetMessageClass(method.input_type)
        if method.client_streaming and method.server_streaming:
            raise NotImplementedError(f"bidirectional streaming is not supported: {method.full_name}")
        if method.client_streaming:
            upload = _client_stream_handler(impl, request_type, admission(method))
            if tracing_on():
                upload = _traced_unary(upload, service.full_name, method.name)
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(upload)
        elif method.server_streaming:
            stream = _stream_handler(impl, request_type, admission(method))
            if tracing_on():
                stream = _traced_stream(stream, service.full_name, method.name)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(stream)
        else:
            unary = _unary_handler(impl, request_type, admission(method))
            if local is not None:
                local[f"/{service.full_name}/{method.name}"] = unary
            if tracing_on():
                unary = _traced_unary(unary, service.full_name, method.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class Admission:
    """Lets a call of one method in: the server is not draining, the caller is signed for it and holds
    the scope the method declares (:func:`shared.rpc.contract.required_scope`)."""

    def __init__(
        self, gate: CallGate, secret: bytes, method: _descriptor.MethodDescriptor, max_age_s: float
    ) -> None:
        self.gate = gate
        self._secret = secret
        self._method = f"/{method.containing_service.full_name}/{method.name}"
        self._scope = required_scope(method)
        self._max_age_s = max_age_s
        self.domain = error_domain(method.containing_service)  # of every error this method answers

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], body: bytes | None) -> None:
        """Enter the gate and bind the caller verified for request ``body`` (None: a client stream);
        raises StrataError (and leaves) otherwise."""
        self.gate.enter()
        try:
            if isinstance(context, LocalContext):
                caller = context.caller  # this process's gateway authenticated it
            else:
                metadata = context.invocation_metadata() or ()
                caller = verify_caller(
                    self._secret, self._method, metadata, body=body, max_age_s=self._max_age_s
                )
            set_current_caller(caller)
            require_scope(self._scope)
        except StrataError:
            self.gate.leave()
            raise


def decode_request(request_type: type[_M], raw: bytes) -> _M:
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


def grpc_code(code: Code) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of ``code``."""
    return _GRPC_CODES[code]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, domain: str) -> None:
    """End the call with the status :func:`shared.api.errors.from_exception` maps ``exc`` to, its
    ErrorInfo in ``domain``."""
    error = from_exception(exc)
    await context.abort(
        grpc_code(error.code), error.message, trailing_metadata=error.trailing_metadata(domain)
    )


def _unary_handler(
    impl: Callable[..., Awaitable[_message.Message]],
    request_type: type[_message.Message],
    admission: Admission,
) -> UnaryHandler:
    return _answering_once(impl, lambda raw: decode_request(request_type, raw), admission, signed_body=True)


def _client_stream_handler(
    impl: Callable[..., Awaitable[_message.Message]],
    request_type: type[_message.Message],
    admission: Admission,
) -> UnaryHandler:
    async def decoded(raw_requests: AsyncIterator[bytes]) -> AsyncIterator[_message.Message]:
        async for raw in raw_requests:
            yield decode_request(request_type, raw)

    return _answering_once(impl, decoded, admission, signed_body=False)


def _answering_once(
    impl: Callable[..., Awaitable[_message.Message]],
    requests: Callable[[Any], Any],
    admission: Admission,
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
            await abort_with(context, exc, admission.domain)
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
            await abort_with(context, exc, admission.domain)
            raise AssertionError("unreachable") from None
        finally:
            gate.leave()

    return handle


def _stream_handler(
    impl: Callable[..., AsyncIterator[_message.Message]],
    request_type: type[_message.Message],
    admission: Admission,
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    gate = admission.gate

    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            admission.admit(context, raw)
        except StrataError as exc:
            await abort_with(context, exc, admission.domain)
        try:
            begin_call(context.invocation_metadata())
            async for response in impl(decode_request(request_type, raw), context):
                yield response.SerializeToString()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc, admission.domain)
        finally:
            gate.leave()

    return handle


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

"""A real gateway process in front of recording upstreams: exactly what reaches a service, and back.

Two in-test gRPC servers stand in for the kv service. They answer every
``/strata.kv.v1.KvService/*`` call with a generic handler, record what the
call carried (metadata, remaining time, cancellation) and behave as the
request's JSON bytes say, which the gateway forwards undecoded:

- unary: ``{"hang": true}`` never answers; ``{"abort": "NOT_FOUND"}`` fails;
  ``{"trailers": true}`` sends :data:`TRAILERS`;
- server streaming (``Watch``): ``{"messages": n, "then": "end" | "hang" |
  "abort", "trailers": bool}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.api.apikeys import parse_api_key
from shared.api.callers import Caller
from shared.api.errors import StrataError
from shared.rpc.identity import sign_caller, verify_caller
from tests.conftest import TEST_INTERNAL_SECRET
from tests.support.calls import bearer
from tests.support.errors import DETAILS_KEY
from tests.support.stack import Stack, start_gateway, stop_process

pytestmark = pytest.mark.e2e

KV = "/strata.kv.v1.KvService/"
GET, WATCH = KV + "Get", KV + "Watch"
CALL_ID = "x-test-call-id"  # an ordinary custom header: it must reach the upstream


def _details() -> bytes:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="FROM_UPSTREAM", domain="test", metadata={"k": "v"}))
    return status_pb2.Status(
        code=grpc.StatusCode.NOT_FOUND.value[0], message="gone", details=[info]
    ).SerializeToString()


# Trailers the upstream sends and the caller must get back byte for byte.
TRAILERS: tuple[tuple[str, str | bytes], ...] = (
    ("x-upstream-note", "plain text, with spaces"),
    ("x-upstream-blob-bin", bytes(range(256))),
    (DETAILS_KEY, _details()),
)


@dataclass
class Seen:
    """One call as an upstream saw it."""

    upstream: str
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    time_remaining: float | None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def values(self, key: str) -> list[str | bytes]:
        return [value for name, value in self.metadata if name == key]


class RecordingUpstream(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A stand-in kv service on a free port, recording into a log shared with its peers."""

    def __init__(self, name: str, log: list[Seen]) -> None:
        self.name = name
        self.log = log
        self.port = 0
        self._server = grpc.aio.server()

    async def start(self) -> None:
        self._server.add_generic_rpc_handlers((self,))
        checks = health.aio.HealthServicer()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(None)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(KV):
            return None
        if method == WATCH:
            return grpc.unary_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> Seen:
        seen = Seen(self.name, method, tuple(context.invocation_metadata() or ()), context.time_remaining())
        self.log.append(seen)
        return seen

    def _unary(self, method: str) -> Any:
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen = self._record(method, context)
            command = json.loads(request or b"{}")
            trailers = TRAILERS if command.get("trailers") else ()
            try:
                if command.get("hang"):
                    await asyncio.sleep(120)
                if "abort" in command:
                    await context.abort(
                        grpc.StatusCode[command["abort"]], "refused upstream", trailing_metadata=trailers
                    )
            except asyncio.CancelledError:
                seen.cancelled.set()
                raise
            context.set_trailing_metadata(trailers)
            return self.name.encode()

        return answer

    def _stream(self, method: str) -> Any:
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            seen = self._record(method, context)
            command = json.loads(request or b"{}")
            trailers = TRAILERS if command.get("trailers") else ()
            try:
                for i in range(command.get("messages", 0)):
                    yield f"{self.name}-{i}".encode()
                if command.get("then") == "hang":
                    await asyncio.sleep(120)
                if command.get("then") == "abort":
                    await context.abort(
                        grpc.StatusCode.ABORTED, "stopped mid-way upstream", trailing_metadata=trailers
                    )
            except (asyncio.CancelledError, GeneratorExit):
                seen.cancelled.set()
                raise
            context.set_trailing_metadata(trailers)

        return answer


@dataclass
class Gateway:
    """A gateway process whose kv upstreams are recording ones."""

    process: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    upstreams: list[RecordingUpstream]
    log: list[Seen]
    auth: tuple[tuple[str, str], ...]

    def unary(self, method: str = GET) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    def stream(self, method: str = WATCH) -> grpc.aio.UnaryStreamMultiCallable:
        return self.channel.unary_stream(method, request_serializer=None, response_deserializer=None)

    def call_metadata(self, *extra: tuple[str, str | bytes]) -> tuple[tuple[str, str | bytes], ...]:
        """The dev key, a fresh call id, and ``extra``; the id is the last entry's value."""
        return (*self.auth, *extra, (CALL_ID, uuid.uuid4().hex))

    async def seen(self, metadata: Sequence[tuple[str, str | bytes]]) -> Seen:
        """The upstream's record of the call made with ``metadata`` (waits for it to arrive)."""
        call_id = metadata[-1][1]
        async with asyncio.timeout(10):
            while True:
                found = [s for s in self.log if s.values(CALL_ID) == [call_id]]
                if found:
                    assert len(found) == 1, found
                    return found[0]
                await asyncio.sleep(0.02)


async def open_gateway(stack: Stack, count: int = 2, **extra: str) -> Gateway:
    log: list[Seen] = []
    upstreams = [RecordingUpstream(name, log) for name in "AB"[:count]]
    for upstream in upstreams:
        await upstream.start()
    addresses = ",".join(f"127.0.0.1:{u.port}" for u in upstreams)
    process, port = await start_gateway(stack, STRATA_KV_UPSTREAMS=addresses, **extra)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Gateway(process, channel, upstreams, log, bearer(stack.api_key))


async def close_gateway(gateway: Gateway) -> None:
    await gateway.channel.close()
    await stop_process(gateway.process)
    for upstream in gateway.upstreams:
        await upstream.stop()


@pytest.fixture(scope="module")
async def gateway(stack) -> AsyncIterator[Gateway]:
    """A gateway that does not trace (so the caller's trace context is its own to pass on)."""
    opened = await open_gateway(stack, OTEL_TRACES_EXPORTER="none")
    yield opened
    await close_gateway(opened)


@pytest.fixture(scope="module")
async def traced_gateway(stack) -> AsyncIterator[Gateway]:
    """A gateway exporting traces, like the stack's."""
    opened = await open_gateway(stack, count=1)
    yield opened
    await close_gateway(opened)


# -- what reaches the upstream ------------------------------------------------------------

HOP_BY_HOP = (
    ("connection", "keep-alive"),
    ("proxy-connection", "keep-alive"),
    ("keep-alive", "timeout=5"),
    ("te", "trailers"),
    ("trailer", "x-something"),
    ("transfer-encoding", "chunked"),
    ("upgrade", "h2c"),
    ("host", "elsewhere.example"),
    ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
    ("proxy-authenticate", "Basic"),
    # Names the gRPC protocol reserves, sent by a caller.
    ("grpc-foo", "made up"),
    ("grpc-previous-rpc-attempts", "3"),
)


async def test_credentials_hop_by_hop_and_forged_identity_headers_never_reach_the_upstream(gateway, stack):
    forged = sign_caller(
        b"forged-secret-forged-secret",
        GET,
        Caller("victim", frozenset({"kv:read"}), "forgedkey0000000", tenant_uid=str(uuid.uuid4())),
        body=b"{}",
    )
    metadata = gateway.call_metadata(*HOP_BY_HOP, *forged, ("x-custom", "kept as is"))
    await gateway.unary()(b"{}", metadata=metadata, timeout=10)
    seen = await gateway.seen(metadata)

    names = [name for name, _ in seen.metadata]
    for name in ("authorization", *(name for name, _ in HOP_BY_HOP)):
        assert name not in names, f"{name} reached the upstream: {seen.metadata}"
    assert seen.values("x-custom") == ["kept as is"]
    # The identity is the gateway's signature alone: one entry per field, none of the forged values.
    identity = [(name, value) for name, value in seen.metadata if name.startswith("x-strata-")]
    assert sorted(name for name, _ in identity) == sorted(name for name, _ in forged)
    assert not set(identity) & set(forged)
    # Signed for the very bytes forwarded, and for no others.
    caller = verify_caller(TEST_INTERNAL_SECRET.encode(), GET, seen.metadata, body=b"{}")
    with pytest.raises(StrataError):
        verify_caller(TEST_INTERNAL_SECRET.encode(), GET, seen.metadata, body=b"{ }")
    key_id = parse_api_key(stack.api_key)
    assert key_id is not None
    assert (caller.tenant, caller.key_id) == ("dev", key_id[0])


async def test_without_tracing_the_callers_trace_context_reaches_the_upstream_unchanged(gateway):
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    metadata = gateway.call_metadata(("traceparent", traceparent), ("tracestate", "vendor=opaque"))
    await gateway.unary()(b"{}", metadata=metadata, timeout=10)
    seen = await gateway.seen(metadata)
    assert seen.values("traceparent") == [traceparent]
    assert seen.values("tracestate") == ["vendor=opaque"]


async def test_with_tracing_the_upstream_gets_the_gateways_span_in_the_callers_trace(traced_gateway):
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    metadata = traced_gateway.call_metadata(("traceparent", f"00-{trace_id}-{parent}-01"))
    await traced_gateway.unary()(b"{}", metadata=metadata, timeout=10)
    seen = await traced_gateway.seen(metadata)
    [forwarded] = seen.values("traceparent")
    version, trace, span, _flags = str(forwarded).split("-")
    assert (version, trace) == ("00", trace_id)
    assert span != parent  # the gateway's client span, not the caller's


# -- routing ----------------------------------------------------------------------------


async def test_round_robin_alternates_skips_a_killed_upstream_and_fails_when_all_are_dead(stack):
    gateway = await open_gateway(stack)
    first, second = gateway.upstreams
    try:
        call = gateway.unary()
        answers = [await call(b"{}", metadata=gateway.auth, timeout=10) for _ in range(6)]
        assert [s.upstream for s in gateway.log] == [a.decode() for a in answers]
        assert set(answers) == {b"A", b"B"}
        assert all(a != b for a, b in itertools.pairwise(answers)), answers

        await first.stop()
        answers = [await call(b"{}", metadata=gateway.auth, timeout=10) for _ in range(6)]
        assert answers == [b"B"] * 6

        await second.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"{}", metadata=gateway.auth, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [s.upstream for s in gateway.log].count("A") == 3
    finally:
        await close_gateway(gateway)


# -- deadlines and cancellation ------------------------------------------------------------

# grpc sends a deadline as a grpc-timeout header rounded up to its unit (10 ms for
# a few seconds), once per hop: the upstream may see that much more than was left.
_TIMEOUT_ROUNDING_S = 0.05


async def test_the_upstream_sees_what_is_left_of_the_callers_deadline(gateway):
    timeout = 8.0
    metadata = gateway.call_metadata()
    await gateway.unary()(b"{}", metadata=metadata, timeout=timeout)
    remaining = (await gateway.seen(metadata)).time_remaining
    assert remaining is not None
    assert timeout - 2.0 < remaining <= timeout + _TIMEOUT_ROUNDING_S


async def test_without_a_caller_deadline_the_upstream_gets_none(gateway):
    metadata = gateway.call_metadata()
    await gateway.unary()(b"{}", metadata=metadata)
    assert (await gateway.seen(metadata)).time_remaining is None


async def test_a_cancelled_unary_call_is_cancelled_at_the_upstream(gateway):
    metadata = gateway.call_metadata()
    call = gateway.unary()(b'{"hang": true}', metadata=metadata, timeout=60)
    seen = await gateway.seen(metadata)
    assert not seen.cancelled.is_set()
    call.cancel()
    await asyncio.wait_for(seen.cancelled.wait(), 10)


async def test_a_cancelled_stream_is_cancelled_at_the_upstream(gateway):
    metadata = gateway.call_metadata()
    call = gateway.stream()(b'{"messages": 1, "then": "hang"}', metadata=metadata, timeout=60)
    assert (await call.read()).startswith((b"A-", b"B-"))
    seen = await gateway.seen(metadata)
    assert not seen.cancelled.is_set()
    call.cancel()
    await asyncio.wait_for(seen.cancelled.wait(), 10)


# -- what comes back ----------------------------------------------------------------------


def trailers_of(trailing: Sequence[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    names = {name for name, _ in TRAILERS}
    return [(name, value) for name, value in trailing or () if name in names]


async def test_a_stream_aborted_upstream_mid_way_reaches_the_caller_with_its_code_message_and_trailers(
    gateway,
):
    call = gateway.stream()(
        b'{"messages": 2, "then": "abort", "trailers": true}', metadata=gateway.call_metadata(), timeout=10
    )
    received = [await call.read(), await call.read()]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert [m[1:] for m in received] == [b"-0", b"-1"]
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert caught.value.details() == "stopped mid-way upstream"
    assert trailers_of(caught.value.trailing_metadata()) == list(TRAILERS)


async def test_trailers_come_back_byte_identical_on_unary_success(gateway):
    call = gateway.unary()(b'{"trailers": true}', metadata=gateway.call_metadata(), timeout=10)
    await call
    assert trailers_of(await call.trailing_metadata()) == list(TRAILERS)


async def test_trailers_come_back_byte_identical_on_unary_error(gateway):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.unary()(
            b'{"abort": "NOT_FOUND", "trailers": true}', metadata=gateway.call_metadata(), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "refused upstream"
    assert trailers_of(caught.value.trailing_metadata()) == list(TRAILERS)


async def test_trailers_come_back_byte_identical_on_stream_success(gateway):
    call = gateway.stream()(
        b'{"messages": 2, "then": "end", "trailers": true}', metadata=gateway.call_metadata(), timeout=10
    )
    assert len([message async for message in call]) == 2
    assert await call.code() == grpc.StatusCode.OK
    assert trailers_of(await call.trailing_metadata()) == list(TRAILERS)

"""Bodies that are no request at all (random bytes, cut-off requests, strings that are not UTF-8),
to every RPC and to health: INVALID_ARGUMENT naming the field, or ``request``."""

from __future__ import annotations

import random

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.hostile.rpcs import RPCS, Rpc, Slot, params, request_for, slots, with_value
from tests.e2e.hostile.stage import Hostile, outcome_of, report
from tests.support.protowire import parses, strings_as_bytes

pytestmark = pytest.mark.e2e


# Byte sequences no UTF-8 decoder may accept; a proto string cannot carry them.
INVALID_UTF8: tuple[bytes, ...] = (
    b"\xed\xa0\x80",  # a lone high surrogate (U+D800), CESU style
    b"\xed\xbf\xbf",  # a lone low surrogate (U+DFFF)
    b"\xc0\xaf",  # an overlong "/"
    b"\x80",  # a continuation byte with nothing before it
    b"\xff\xfe",
)


_MARKER = b"ZqXjZqXjZqXjZqXj"


def _utf8_field(rpc: Rpc, slot: Slot) -> str:
    """The field a BadRequest names for a string that is not UTF-8 put at ``slot`` by :func:`with_value`."""
    parts, desc = [], rpc.method.input_type
    for name in slot.path:
        f = desc.fields_by_name[name]
        parts.append(f"{name}[0]" if f.is_repeated else name)  # with_value fills the first element
        desc = f.message_type
    suffix = {
        "string": "",
        "struct_key": ".fields",  # a map key that is not UTF-8 names the map
        "struct_value": '.fields["p"].string_value',
        "value": ".string_value",
    }[slot.kind]
    return ".".join(parts) + suffix


def _undecodable(rpc: Rpc) -> list[tuple[bytes, tuple[str, ...]]]:
    """Bodies this very protobuf library refuses to parse, each with the fields the answer must name.

    Random bytes and cut-off requests malformed whatever their strings hold name
    ``request``; a request whose one string is not UTF-8 names that field.
    """
    request_type = message_factory.GetMessageClass(rpc.method.input_type)
    # The same message with bytes for strings: it refuses what is malformed, not bad UTF-8.
    lenient = strings_as_bytes(request_type)

    def malformed(body: bytes) -> bool:
        return not parses(request_type, body) and not parses(lenient, body)

    rng = random.Random(rpc.path)  # the same bodies every run
    bodies: list[tuple[bytes, tuple[str, ...]]] = []
    while len(bodies) < 6:
        body = rng.randbytes(rng.randint(1, 64))
        if malformed(body):
            bodies.append((body, ("request",)))
    whole = request_for(rpc).SerializeToString()
    cuts = [whole[:end] for end in range(1, len(whole)) if malformed(whole[:end])]
    bodies.extend((cut, ("request",)) for cut in cuts[:: max(1, len(cuts) // 6)][:6])
    for slot in (
        s for s in slots(rpc.method.input_type) if s.kind in ("string", "struct_key", "struct_value", "value")
    ):
        for bad in INVALID_UTF8:
            # Replaced by as many bytes, so every length prefix stays right.
            encoded = with_value(rpc, slot, _MARKER.decode()).SerializeToString()
            assert encoded.count(_MARKER) == 1, slot
            body = encoded.replace(_MARKER, b"Z" * (len(_MARKER) - len(bad)) + bad)
            assert not parses(request_type, body), f"{slot.path} with {bad!r} still parses"
            bodies.append((body, (_utf8_field(rpc, slot),)))
    return bodies


@pytest.mark.parametrize("rpc", params(RPCS))
async def test_bodies_that_are_not_requests_are_invalid_argument(hostile: Hostile, rpc: Rpc) -> None:
    # StrataServer decodes every request itself (handlers take raw bytes), so grpc's own
    # deserializer never runs on these: the answer is the bootstrap's INVALID_ARGUMENT,
    # naming the field that is not UTF-8, or ``request`` for bytes malformed otherwise.
    cases = _undecodable(rpc)
    failures = []
    for label, outcome in await hostile.both(rpc, [body for body, _ in cases]):
        fields = cases[int(label.split("#")[1])][1]
        expected = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields)
        if (outcome.code, outcome.reason, outcome.violations) != expected:
            failures.append(
                f"{label}: {outcome.code.name} {outcome.reason} {outcome.violations}, not {fields}"
            )
    report(failures, "undecodable bodies not answered INVALID_ARGUMENT naming the field")
    await hostile.assert_healthy()


async def test_health_answers_an_unparsable_body_with_invalid_argument(hostile: Hostile) -> None:
    # Registered with grpc's deserializer, health answered UNKNOWN "Unexpected <class
    # 'google.protobuf.message.DecodeError'>"; StrataServer decodes its requests itself, so the
    # answer is the bootstrap's INVALID_ARGUMENT, from every process and from the gateway's own.
    undecodable = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ("request",))
    failures = []
    for name, channel in (("gateway", hostile.gateway), *hostile.direct.items()):
        for method, call in (
            ("Check", channel.unary_unary("/grpc.health.v1.Health/Check")),
            ("Watch", channel.unary_stream("/grpc.health.v1.Health/Watch")),
        ):
            try:
                reply = call(b"\xff\xff\xff", timeout=5)
                await (reply if method == "Check" else reply.read())
            except grpc.aio.AioRpcError as exc:
                outcome = outcome_of(exc)
                hostile.tally[outcome.code.name] += 1
                if (outcome.code, outcome.reason, outcome.violations) != undecodable:
                    failures.append(f"{name} {method}: {outcome.code.name} {outcome.details[:120]!r}")
            else:
                failures.append(f"{name} {method}: answered an unparsable body")
    report(failures, "unparsable health requests not answered INVALID_ARGUMENT (request)")
    for channel in (hostile.gateway, *hostile.direct.values()):  # a well-formed Watch still streams
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    await hostile.assert_healthy()

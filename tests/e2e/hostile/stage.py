"""The stage the attacker acts on: how one call ended (Outcome), making raw calls, and the Hostile
object (channels, keys, the tally of calls, the baseline everything is compared with)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.admin.v1 import admin_pb2
from strata.tenants.v1 import tenants_pb2

from shared.api.callers import Caller
from shared.config.settings import Settings
from shared.rpc.identity import sign_caller
from tests.conftest import TEST_INTERNAL_SECRET
from tests.e2e.hostile.database import database_snapshot
from tests.e2e.hostile.names import ATTACKER, THROWAWAY
from tests.e2e.hostile.rpcs import BY_ID, PROBES, Rpc, request_for
from tests.support.calls import bearer
from tests.support.stack import Stack

Via = Literal["gateway", "direct"]
Metadata = Sequence[tuple[str, str]]
OK = grpc.StatusCode.OK
# The deployment's internal secret, which the suite knows (a caller does not): with it,
# the suite signs identities as the gateway does.
SECRET = TEST_INTERNAL_SECRET.encode()
MAX_MESSAGE_BYTES = Settings().max_message_bytes  # what the stack runs with: it sets no other
# Answers that say clearly what was wrong with a request (each with an ErrorInfo).
CLEAR = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


# -- calling -------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended."""

    code: grpc.StatusCode
    details: str = ""
    reason: str = ""  # the ErrorInfo's reason; "" when the status carries none
    violations: tuple[str, ...] = ()  # the BadRequest's field paths
    response: bytes = b""  # the (first) response message, on OK

    def problem(self) -> str | None:
        """Why this is not an acceptable answer to hostile input; None when it is."""
        if self.code == OK:
            return None
        if self.code not in CLEAR:
            return f"{self.code.name}: {self.details[:200]}"
        if not self.reason:
            return f"{self.code.name} without an ErrorInfo: {self.details[:200]}"
        return None


def outcome_of(exc: grpc.aio.AioRpcError) -> Outcome:
    """How a failed call ended: its status, its ErrorInfo's reason, its BadRequest's field paths."""
    reason, violations = "", ()
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
                if detail.Unpack(info):
                    reason = info.reason
                elif detail.Unpack(bad):
                    violations = tuple(v.field for v in bad.field_violations)
    return Outcome(exc.code(), exc.details() or "", reason, violations)


async def invoke(
    channel: grpc.aio.Channel, rpc: Rpc, body: bytes | Sequence[bytes], metadata: Metadata, timeout: float
) -> Outcome:
    """One call with raw bytes (a sequence of messages for a client stream)."""
    try:
        if rpc.method.client_streaming:
            messages = [body] if isinstance(body, bytes) else list(body)

            async def upload() -> AsyncIterator[bytes]:
                for item in messages:
                    yield item

            call = channel.stream_unary(rpc.path, request_serializer=None, response_deserializer=None)
            return Outcome(OK, response=await call(upload(), metadata=metadata, timeout=timeout))
        assert isinstance(body, bytes)
        if rpc.method.server_streaming:
            stream = channel.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)(
                body, metadata=metadata, timeout=timeout
            )
            try:
                async for first in stream:  # the first message tells: a watch never ends by itself
                    return Outcome(OK, response=first)
                return Outcome(OK)
            finally:
                stream.cancel()
        call = channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)
        return Outcome(OK, response=await call(body, metadata=metadata, timeout=timeout))
    except grpc.aio.AioRpcError as exc:
        return outcome_of(exc)


def signed_body(rpc: Rpc, body: bytes | Sequence[bytes]) -> bytes | None:
    """What an identity is signed for: the request's bytes, or None for a client stream."""
    return None if rpc.method.client_streaming or not isinstance(body, bytes) else body


def report(failures: Sequence[str], what: str) -> None:
    """Fail listing the first 40 of ``failures``, headed by their count and ``what`` they are."""
    assert not failures, f"{len(failures)} {what}:\n" + "\n".join(failures[:40])


# -- the stage: the attacker's channels and keys, and the bookkeeping -----------------

# Large requests and responses are the servers' to refuse, not this client's.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass
class Hostile:
    """The attacker's view of the running stack: channels, keys, and a count of every call made."""

    stack: Stack
    settings: Settings
    gateway: grpc.aio.Channel
    direct: dict[str, grpc.aio.Channel]
    keys: dict[str, str]  # upstream -> the attacker's admin key used for it (rate limits are per key)
    victim_key: str
    tally: Counter[str] = field(default_factory=Counter)
    baseline: dict[str, frozenset[str]] = field(default_factory=dict)
    since: int = 0  # the KV revision when the baseline was taken
    instances: set[str] = field(default_factory=set)
    output_mark: int = 0
    limit: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(32))

    def signed(self, rpc: Rpc, caller: Caller = ATTACKER, body: bytes | Sequence[bytes] = b"") -> Metadata:
        """An identity as the gateway signs it, for ``body`` (an upload's for any stream)."""
        return sign_caller(SECRET, rpc.path, caller, body=signed_body(rpc, body))

    async def call(
        self,
        rpc: Rpc,
        body: bytes | Sequence[bytes],
        via: Via,
        metadata: Metadata | None = None,
        timeout: float = 15.0,
    ) -> Outcome:
        """Call ``rpc`` with raw ``body`` as the attacker (or with ``metadata``), and count it."""
        if metadata is None:
            metadata = bearer(self.keys[rpc.upstream]) if via == "gateway" else self.signed(rpc, body=body)
        channel = self.gateway if via == "gateway" else self.direct[rpc.upstream]
        async with self.limit:
            outcome = await invoke(channel, rpc, body, metadata, timeout)
        self.tally[outcome.code.name] += 1
        return outcome

    async def both(self, rpc: Rpc, bodies: Sequence[bytes]) -> list[tuple[str, Outcome]]:
        """Each body through the gateway (a routed method), then straight to the service; (label,
        outcome) each.

        Bodies go concurrently; one body's two calls do not, so that the second meets
        what the first made (the same things, twice at once, would be a race test).
        """

        # An internal method is not routed: straight to its service only (see test_coverage).
        vias: tuple[Via, ...] = ("gateway", "direct") if rpc.routed else ("direct",)

        async def each_way(body: bytes) -> list[Outcome]:
            return [await self.call(rpc, body, via) for via in vias]

        answers = await asyncio.gather(*(each_way(body) for body in bodies))
        return [
            (f"{via} #{i}", outcome)
            for i, outcomes in enumerate(answers)
            for via, outcome in zip(vias, outcomes, strict=True)
        ]

    async def assert_healthy(self) -> None:
        """Every process answers its health check, and a normal call works through each upstream."""
        ports = {"gateway": self.stack.ports["gateway"], **{up: self.stack.ports[up] for up in self.direct}}
        for name, port in ports.items():
            channel = self.gateway if name == "gateway" else self.direct[name]
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name} (:{port}) is not serving"
        for probe in PROBES:
            rpc = BY_ID[probe]
            body = request_for(rpc).SerializeToString()
            outcome = await invoke(self.gateway, rpc, body, bearer(self.keys[rpc.upstream]), 15)
            assert outcome.code == OK, f"{probe} after hostile input: {outcome}"

    async def service_instances(self) -> set[str]:
        """``component/host:pid`` of each of the stack's service processes, as they publish themselves.

        Only the launcher's own children count: other tests' processes (and the
        published figures of dead ones, kept for a few seconds) are not the stack's.
        """
        rpc = BY_ID["OperationsService.GetSystemHealth"]
        outcome = await invoke(self.gateway, rpc, b"", bearer(self.keys["admin"]), 15)
        assert outcome.code == OK, outcome
        return {
            f"{p.component}/{p.instance}"
            for p in rpc.response(outcome.response).processes
            if p.component in self.direct
            and _child_of(int(p.instance.rsplit(":", 1)[1]), self.stack.process.pid)
        }

    def restarts(self) -> list[str]:
        """Launcher lines since the stage was set that say a process died."""
        return [line for line in self.stack.output[self.output_mark :] if "restarting" in line]

    async def crashed(self) -> int:
        """Processes that died (or were replaced) since the stage was set."""
        now = await self.service_instances()
        return max(len(self.restarts()), len(self.instances - now))  # a restart shows in both

    async def snapshot(
        self, exclude: Sequence[str] = THROWAWAY, since: int | None = None
    ) -> dict[str, frozenset[str]]:
        """See :func:`database_snapshot`; ``since`` defaults to the KV revision of the baseline."""
        return await database_snapshot(self.settings, exclude, self.since if since is None else since)


def _child_of(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent  # "pid (comm) state ppid ..."


async def make_tenant(gateway: grpc.aio.Channel, admin: str, slug: str, *scopes: str) -> str:
    """Register ``slug`` and return a new key of it with ``scopes``."""
    create, make_key = BY_ID["TenantService.CreateTenant"], BY_ID["ApiKeyService.CreateApiKey"]
    request = tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug))
    outcome = await invoke(gateway, create, request.SerializeToString(), bearer(admin), 15)
    assert outcome.code in (OK, grpc.StatusCode.ALREADY_EXISTS), outcome
    key = admin_pb2.CreateApiKeyRequest(tenant=slug, name="hostile", scopes=list(scopes))
    outcome = await invoke(gateway, make_key, key.SerializeToString(), bearer(admin), 15)
    assert outcome.code == OK, outcome
    return admin_pb2.CreateApiKeyResponse.FromString(outcome.response).api_key

"""Any set of roles in one process (``python -m roles``): the same calls, health and reflection
through its gateway as through the split shape's, and a clean stop."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from devstack.roles import roles_environment
from gateway.routes import ROUTED_SERVICES
from roles.host import SERVICE_BUILDERS
from shared.config.settings import ROLES
from tests.support.calls import bearer
from tests.support.errors import error_info, field_violations
from tests.support.stack import Stack, run_to_exit, start_roles

pytestmark = pytest.mark.e2e


def test_every_role_has_a_builder_in_the_order_roles_start() -> None:
    assert (*SERVICE_BUILDERS, "gateway") == ROLES


async def test_all_roles_in_one_process_serve_through_its_gateway(stack: Stack, namespace: str) -> None:
    hosted = await start_roles(stack, "all")
    ports, ready = hosted.ports, hosted.ready
    try:
        assert ready == list(ROLES)
        key = bearer(stack.api_key)  # the same database and pepper: the stack's key works here
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            kv = kv_pb2_grpc.KvServiceStub(channel)
            put = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"one"), metadata=key)
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=key)
            assert (got.kv.value, got.kv.mod_revision) == (b"one", put.header.revision)
            health = await admin_pb2_grpc.OperationsServiceStub(channel).GetSystemHealth(
                admin_pb2.GetSystemHealthRequest(), metadata=key
            )
            assert health.status == admin_pb2.SERVING_STATUS_SERVING, list(health.reasons)
            assert {c.component for c in health.components} >= set(ROLES)
            listed = await _reflected(channel)
            routed = {s.full_name for services in ROUTED_SERVICES.values() for s in services}
            assert routed <= listed
            for service in ("", *routed):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        code = await hosted.stop()
    assert code == 0


async def test_some_roles_in_one_process_bind_only_their_ports(stack: Stack) -> None:
    hosted = await start_roles(stack, "vector,kv")
    ports, ready = hosted.ports, hosted.ready
    try:
        assert ready == ["kv", "vector"]  # in the order roles start, whatever the order named
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no gateway here
    finally:
        assert await hosted.stop() == 0


@pytest.mark.parametrize("roles", ["kv,nope", "kv,kv", "", "gateway,"])
def test_an_unknown_or_repeated_role_is_a_configuration_error(stack: Stack, roles: str) -> None:
    env, _ = roles_environment(stack.env, roles)
    if roles == "":
        env["STRATA_ROLES"] = " , "
    result = run_to_exit("roles", env)
    assert result.returncode == 2, result.stderr
    assert "STRATA_ROLES" in result.stderr


async def _reflected(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for reply in stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        return {service.name for service in reply.list_services_response.service}
    raise AssertionError("no reflection answer")


# -- one hop: the gateway hands unary calls to the services in its process ----------------

SERVER, CLIENT = 2, 3


async def test_a_call_in_one_process_is_one_hop_in_one_trace(
    stack: Stack, receiver, make_key, namespace: str
) -> None:
    api_key, _ = await make_key("acme", "kv:read", "kv:write")  # new: its lookup is part of the trace
    hosted = await start_roles(stack, "all")
    ports = hosted.ports
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            await kv_pb2_grpc.KvServiceStub(channel).Put(
                kv_pb2.PutRequest(namespace=namespace, key="traced", value=b"v"),
                metadata=bearer(api_key),
            )

        def root(span) -> bool:
            return (
                span.service == "strata-all" and span.kind == SERVER and span.name.endswith("KvService/Put")
            )

        def complete(spans) -> bool:
            return any(
                root(r)
                and any(
                    s.trace_id == r.trace_id and s.attributes.get("db.system") == "postgresql" for s in spans
                )
                for r in spans
            )

        spans = await receiver.wait_for(complete, timeout=20)
    finally:
        await hosted.stop()
    top = next(r for r in spans if root(r) and complete([r, *[s for s in spans if s.trace_id == r.trace_id]]))
    trace = {s.span_id: s for s in spans if s.trace_id == top.trace_id}
    puts = [s for s in trace.values() if s.name.endswith("KvService/Put")]
    assert puts == [top], "one span for the call: no client span, no second server span"
    # The key was checked in-process too: no RPC for it, its statement beneath the call's span.
    assert not [s for s in trace.values() if s.name.endswith("AuthenticateApiKey")]
    statements = " ".join(str(s.attributes.get("db.statement", "")) for s in trace.values())
    assert "api_keys" in statements, statements[:300]
    database = next(s for s in trace.values() if s.attributes.get("db.system") == "postgresql")
    ancestor = database
    while ancestor.parent_span_id in trace:
        ancestor = trace[ancestor.parent_span_id]
    assert ancestor is top  # the statement is part of the gateway's span of the call


async def test_both_shapes_answer_alike(stack: Stack, namespace: str) -> None:
    # Answers, details and trailing metadata through the split shape's gateway and through an
    # all-roles process's, where the call never leaves the process.
    hosted = await start_roles(stack, "all")
    ports = hosted.ports
    key = bearer(stack.api_key)
    try:
        outcomes = []
        for shape, address in enumerate((stack.gateway, f"127.0.0.1:{ports['gateway']}")):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = kv_pb2_grpc.KvServiceStub(channel)
                outcomes.append(await _answers(stub, f"{namespace}-{shape}", key))
    finally:
        await hosted.stop()
    split, joined = outcomes
    assert split == joined
    assert [o[0] for o in split] == [
        "OK",
        "OK",
        "ABORTED",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
    ]


async def _answers(kv: kv_pb2_grpc.KvServiceStub, namespace: str, key) -> list[tuple[object, ...]]:
    """What a few calls answer: code, ErrorInfo (domain, reason, metadata), violations, and whether
    a write's answer carried a consistency token."""
    # One after the other: a grpc.aio call starts when it is made.
    calls = [
        lambda: kv.Put(kv_pb2.PutRequest(namespace=namespace, key="same", value=b"v"), metadata=key),
        lambda: kv.Get(kv_pb2.GetRequest(namespace=namespace, key="same"), metadata=key),
        lambda: kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key="same", value=b"w", if_revision=999_999_999),
            metadata=key,
        ),
        lambda: kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"), metadata=key),
        lambda: kv.Get(kv_pb2.GetRequest(namespace="", key="k"), metadata=key),
    ]
    answered = []
    for make in calls:
        call = make()
        try:
            await call
            trailing = dict(await call.trailing_metadata())
            answered.append(("OK", "strata-consistency-token" in trailing))
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            described = (info.domain, info.reason, sorted(k for k in info.metadata))
            invalid = exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            answered.append((exc.code().name, described, field_violations(exc) if invalid else {}))
    return answered


async def test_the_production_shape_keeps_the_owner_url_and_the_pepper_out_of_the_front(
    stack: Stack, namespace: str
) -> None:
    # docs/SECURITY.md's advice: the gateway and the data services in one process without the
    # owner's URL or the key pepper, admin apart (here the stack's), reached as an upstream.
    env, ports = roles_environment(stack.env, "gateway,kv,tenants,vector")
    for secret in ("STRATA_MIGRATE_DATABASE_URL", "STRATA_KEY_PEPPER"):
        del env[secret]
    env["STRATA_ADMIN_UPSTREAMS"] = f"127.0.0.1:{stack.ports['admin']}"
    hosted = await start_roles(stack, "gateway,kv,tenants,vector", env=env, ports=ports)
    ports, ready = hosted.ports, hosted.ready
    try:
        assert ready == ["kv", "tenants", "vector", "gateway"]
        key = bearer(stack.api_key)  # checked by the stack's admin, over the internal hop
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            kv = kv_pb2_grpc.KvServiceStub(channel)
            await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"front"), metadata=key)
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=key)
            assert got.kv.value == b"front"
            health = await admin_pb2_grpc.OperationsServiceStub(channel).GetSystemHealth(
                admin_pb2.GetSystemHealthRequest(), metadata=key
            )
            assert health.components  # admin's answer, routed to the stack's admin
    finally:
        assert await hosted.stop() == 0

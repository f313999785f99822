"""Any set of roles in one process (``python -m roles``): the same calls, health and reflection
through its gateway as through the split shape's, and a clean stop."""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from devstack.ports import free_port
from gateway.routes import ROUTED_SERVICES
from roles.host import BUILDERS
from shared.config.settings import ROLES
from tests.conftest import PROJECT_ROOT
from tests.support.calls import bearer
from tests.support.stack import Stack, run_to_exit

pytestmark = pytest.mark.e2e


def roles_environment(stack: Stack, roles: str) -> tuple[dict[str, str], dict[str, int]]:
    """``stack``'s settings (backends, secrets) for a process hosting ``roles``, on ports of its own."""
    ports = {role: free_port() for role in ROLES}
    env = {k: v for k, v in stack.env.items() if not k.endswith("_METRICS_PORT")}  # the stack's own
    env.update({f"STRATA_{role.upper()}_PORT": str(port) for role, port in ports.items()})
    env["STRATA_ROLES"] = roles
    return env, ports


async def start_roles(
    stack: Stack, roles: str
) -> tuple[asyncio.subprocess.Process, dict[str, int], list[str]]:
    """A ``python -m roles`` process; (process, ports, the roles it said READY for, in order)."""
    env, ports = roles_environment(stack, roles)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roles", env=env, cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    expected = ROLES if roles == "all" else tuple(r for r in ROLES if r in roles.split(","))
    ready: list[str] = []
    while len(ready) < len(expected):
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("READY "), f"not ready: {line!r}"
        role, address = line.split()[1:3]
        assert address == f"127.0.0.1:{ports[role]}"
        ready.append(role)
    return process, ports, ready


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 60)


def test_every_role_has_a_builder_in_the_order_roles_start() -> None:
    assert tuple(BUILDERS) == ROLES and ROLES[-1] == "gateway"


async def test_all_roles_in_one_process_serve_through_its_gateway(stack: Stack, namespace: str) -> None:
    process, ports, ready = await start_roles(stack, "all")
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
        code = await stop(process)
    assert code == 0


async def test_some_roles_in_one_process_bind_only_their_ports(stack: Stack) -> None:
    process, ports, ready = await start_roles(stack, "vector,kv")
    try:
        assert ready == ["kv", "vector"]  # in the order roles start, whatever the order named
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no gateway here
    finally:
        assert await stop(process) == 0


@pytest.mark.parametrize("roles", ["kv,nope", "kv,kv", "", "gateway,"])
def test_an_unknown_or_repeated_role_is_a_configuration_error(stack: Stack, roles: str) -> None:
    env, _ = roles_environment(stack, roles)
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

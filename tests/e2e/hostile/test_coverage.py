"""The suite knows every RPC the protos declare; each service is served on its own port, and each
public one through the gateway, which serves no internal one."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared.api.callers import INTERNAL_SCOPE
from tests.e2e.hostile.rpcs import LIST_RPCS, ROUTES, RPCS, request_for
from tests.e2e.hostile.stage import Hostile

pytestmark = pytest.mark.e2e


def test_the_suite_knows_every_rpc_and_where_it_is_served() -> None:
    public = {rpc.path for rpc in RPCS if rpc.scope != INTERNAL_SCOPE}
    assert public == set(ROUTES), "the gateway routes other methods than the protos declare public"
    assert {rpc.upstream for rpc in RPCS} == {route.upstream for route in ROUTES.values()}
    internal = [rpc for rpc in RPCS if rpc.scope == INTERNAL_SCOPE]
    assert {rpc.service.file.package for rpc in internal} == {"strata.internal.v1"}
    assert len(RPCS) > 40 and len(LIST_RPCS) >= 7 and len(internal) == 2  # what it should find


async def test_no_internal_method_is_served_through_the_gateway(hostile: Hostile) -> None:
    # Not routed at all: the gateway has no handler, so not even an operator's key reaches one.
    for rpc in RPCS:
        if rpc.scope == INTERNAL_SCOPE:
            outcome = await hostile.call(rpc, request_for(rpc).SerializeToString(), "gateway")
            assert outcome.code == grpc.StatusCode.UNIMPLEMENTED, (rpc.id, outcome)


async def test_every_service_is_served_on_its_own_port_and_through_the_gateway(hostile: Hostile) -> None:
    async def listed(channel: grpc.aio.Channel) -> set[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for reply in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            return {service.name for service in reply.list_services_response.service}
        raise AssertionError("no reflection answer")

    everything = {rpc.service.full_name for rpc in RPCS}
    assert (await listed(hostile.gateway)) & everything == {route.service for route in ROUTES.values()}
    for upstream, channel in hostile.direct.items():
        own = {rpc.service.full_name for rpc in RPCS if rpc.upstream == upstream}
        assert (await listed(channel)) & everything == own, upstream

"""The suite knows every RPC the protos declare, and each service is served on its own port and
through the gateway."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.hostile.rpcs import LIST_RPCS, ROUTES, RPCS
from tests.e2e.hostile.stage import Hostile

pytestmark = pytest.mark.e2e


def test_the_suite_knows_every_rpc_and_where_it_is_served() -> None:
    assert {rpc.path for rpc in RPCS} == set(ROUTES), (
        "the gateway routes other methods than the protos declare"
    )
    assert {rpc.upstream for rpc in RPCS} == {route.upstream for route in ROUTES.values()}
    assert len(RPCS) > 40 and len(LIST_RPCS) >= 7  # the enumeration found what it should


async def test_every_service_is_served_on_its_own_port_and_through_the_gateway(hostile: Hostile) -> None:
    async def listed(channel: grpc.aio.Channel) -> set[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for reply in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            return {service.name for service in reply.list_services_response.service}
        raise AssertionError("no reflection answer")

    everything = {rpc.service.full_name for rpc in RPCS}
    assert everything <= await listed(hostile.gateway)
    for upstream, channel in hostile.direct.items():
        own = {rpc.service.full_name for rpc in RPCS if rpc.upstream == upstream}
        assert (await listed(channel)) & everything == own, upstream

"""A service's methods may come from several servicers (one a concern), each method from exactly one."""

from __future__ import annotations

import pytest
from strata.admin.v1 import admin_pb2

from shared.config.settings import Settings
from shared.rpc.server import StrataServer
from tests.conftest import TEST_INTERNAL_SECRET

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
METHODS = [method.name for method in SERVICE.methods]


def _servicer(*names: str) -> object:
    async def method(request: object, context: object) -> None:
        return None

    return type("Part", (), {name: staticmethod(method) for name in names})()


def _server() -> StrataServer:
    return StrataServer(Settings(internal_secret=TEST_INTERNAL_SECRET), "admin")


async def test_methods_split_over_servicers_are_all_served() -> None:
    half = len(METHODS) // 2
    server = _server()
    server.add_servicer([_servicer(*METHODS[:half]), _servicer(*METHODS[half:])], SERVICE)
    assert SERVICE.full_name in server._service_names


@pytest.mark.parametrize(
    ("parts", "served_by"),
    [
        (lambda: [_servicer(*METHODS[1:])], "0"),  # the first method has no servicer
        (lambda: [_servicer(*METHODS), _servicer(METHODS[0])], "2"),  # and here two
    ],
)
async def test_a_method_served_by_none_or_two_servicers_is_refused(parts, served_by) -> None:
    with pytest.raises(TypeError, match=f"{SERVICE.methods[0].full_name} is served by {served_by} "):
        _server().add_servicer(parts(), SERVICE)

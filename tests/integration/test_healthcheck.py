"""The container health-check command against a real server."""

from __future__ import annotations

import asyncio

from devstack.ports import free_port
from shared.rpc.healthcheck import main


async def test_a_serving_server_passes(kv_server):
    assert await asyncio.to_thread(main, [f"127.0.0.1:{kv_server.port}"]) == 0
    assert await asyncio.to_thread(main, [f"127.0.0.1:{kv_server.port}", "strata.kv.v1.KvService"]) == 0


async def test_an_unknown_service_or_a_closed_port_fails(kv_server):
    assert await asyncio.to_thread(main, [f"127.0.0.1:{kv_server.port}", "no.such.Service"]) == 1
    assert await asyncio.to_thread(main, [f"127.0.0.1:{free_port()}"]) == 1


def test_no_address_is_a_usage_error():
    assert main([]) == 2

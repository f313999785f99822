"""Callers without a valid key cost the gateway little and leave nothing behind.

Each test runs a gateway process of its own in front of the session's services.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from tests.support.calls import bearer
from tests.support.errors import error_info
from tests.support.stack import start_gateway, stop_process


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def get_with(stub: kv_pb2_grpc.KvServiceStub, token: str) -> grpc.StatusCode:
    try:
        await stub.Get(kv_pb2.GetRequest(namespace="n", key="k"), metadata=bearer(token), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def flood(stub: kv_pb2_grpc.KvServiceStub, tokens: list[str]) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    for start in range(0, len(tokens), 50):
        for code in await asyncio.gather(*(get_with(stub, t) for t in tokens[start : start + 50])):
            codes[code] = codes.get(code, 0) + 1
    return codes


async def test_junk_and_unknown_tokens_leave_the_gateways_memory_flat(stack):
    # Before: each junk token was looked up and cached whole (~20 kB), +57 MiB in 3,000 calls.
    process, port = await start_gateway(stack)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            await flood(stub, [secrets.token_urlsafe(5250) for _ in range(300)])  # warm up
            before = rss_mib(process.pid)

            junk = await flood(stub, [secrets.token_urlsafe(5250) for _ in range(3000)])  # ~7,000 chars
            unknown = await flood(
                stub, [f"sk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}" for _ in range(3000)]
            )
            grown = rss_mib(process.pid) - before
            print(f"gateway RSS {before:.1f} MiB, +{grown:.1f} MiB after 6,000 unauthenticated calls")
    finally:
        await stop_process(process)
    assert junk == {grpc.StatusCode.UNAUTHENTICATED: 3000}
    assert unknown == {grpc.StatusCode.UNAUTHENTICATED: 3000}
    assert grown < 8, f"the gateway grew {grown:.1f} MiB from 6,000 unauthenticated calls"


async def test_an_address_that_keeps_failing_is_refused_before_any_lookup(stack, make_key):
    process, port = await start_gateway(
        stack, STRATA_AUTH_FAILURES_PER_PEER_RPS="0.5", STRATA_AUTH_FAILURES_PER_PEER_BURST="5"
    )
    try:
        good_key, _ = await make_key("acme", "kv:read")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            assert await get_with(stub, good_key) in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
            codes = [await get_with(stub, f"sk_{secrets.token_hex(8)}_{'x' * 43}") for _ in range(8)]
            assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5
            assert codes[5:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
            try:
                await stub.Get(kv_pb2.GetRequest(namespace="n", key="k"), metadata=bearer("sk_junk"))
            except grpc.aio.AioRpcError as exc:
                assert error_info(exc).reason == "TOO_MANY_FAILED_ATTEMPTS"
            # A key known good keeps working from the same address.
            assert await get_with(stub, good_key) in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
    finally:
        await stop_process(process)


@pytest.mark.parametrize("limit", [256])
async def test_health_watches_need_no_key_and_are_capped(stack, limit):
    process, port = await start_gateway(stack)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    watches = []
    try:
        for number in range(limit):
            watch = health_pb2_grpc.HealthStub(channels[number % 2]).Watch(health_pb2.HealthCheckRequest())
            await watch.read()  # the first status: the watch is being served
            watches.append(watch)
        over = health_pb2_grpc.HealthStub(channels[0]).Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await over.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "TOO_MANY_HEALTH_WATCHES"
        # Check, unary, still answers; and a closed watch frees its place.
        check = await health_pb2_grpc.HealthStub(channels[1]).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        watches.pop().cancel()
        await asyncio.sleep(0.2)
        again = health_pb2_grpc.HealthStub(channels[0]).Watch(health_pb2.HealthCheckRequest())
        assert (await again.read()).status == health_pb2.HealthCheckResponse.SERVING
        again.cancel()
    finally:
        for watch in watches:
            watch.cancel()
        for channel in channels:
            await channel.close()
        await stop_process(process)

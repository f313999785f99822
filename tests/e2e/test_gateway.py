"""The gateway, as real processes: routing, deadlines, auth, scopes, tenancy, limits, revocation.

What exactly reaches a service and comes back (headers, deadlines,
cancellation, trailers, round robin) is checked against recording
upstreams in test_gateway_upstreams.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.internal.v1 import internal_pb2, internal_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from shared.api.callers import Caller
from shared.rpc.identity import sign_caller
from tests.support.calls import bearer
from tests.support.errors import error_info
from tests.support.stack import start_gateway, stop_process

pytestmark = pytest.mark.e2e


@pytest.fixture
def namespace() -> str:
    return f"gw-{uuid.uuid4().hex[:10]}"


async def test_unary_calls_are_routed_and_answered(gw_kv, admin_metadata, namespace):
    put = await gw_kv.Put(
        kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=admin_metadata
    )
    got = await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=admin_metadata)
    assert got.kv.value == b"v" and got.kv.mod_revision == put.header.revision


async def test_streaming_calls_are_routed(gw_kv, admin_metadata, namespace):
    stream = gw_kv.Watch(kv_pb2.WatchRequest(namespace=namespace, prefix=""), metadata=admin_metadata)
    assert (await asyncio.wait_for(stream.read(), 10)).created
    await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="w", value=b"1"), metadata=admin_metadata)
    event = (await asyncio.wait_for(stream.read(), 10)).events[0]
    stream.cancel()
    assert (event.kv.key, event.kv.value) == ("w", b"1")


async def test_every_error_of_a_service_carries_that_services_domain(gateway_channel, make_key, namespace):
    # One domain per service, whoever answers: the gateway refusing, a shared layer of the
    # service (a page token, checked in shared.api), or the service's own code.
    reader = bearer((await make_key("acme", "kv:read", "vector:read"))[0])
    kv = kv_pb2_grpc.KvServiceStub(gateway_channel)
    vector = vector_pb2_grpc.VectorServiceStub(gateway_channel)
    operations = admin_pb2_grpc.OperationsServiceStub(gateway_channel)
    calls = {
        "no key": (kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k")), "MISSING_API_KEY"),
        "no scope": (
            kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=reader),
            "MISSING_SCOPE",
        ),
        "operator only": (
            operations.GetSystemHealth(admin_pb2.GetSystemHealthRequest(), metadata=reader),
            "MISSING_SCOPE",
        ),
        "kv page token": (
            kv.List(kv_pb2.ListRequest(namespace=namespace, page_token="garbage"), metadata=reader),
            "INVALID_ARGUMENT",
        ),
        "vector page token": (
            vector.ListCollections(vector_pb2.ListCollectionsRequest(page_token="garbage"), metadata=reader),
            "INVALID_ARGUMENT",
        ),
        "absent key": (kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"), metadata=reader), None),
    }
    domains = {"kv": "strata.kv.v1", "vector": "strata.vector.v1", "operator": "strata.admin.v1"}
    for what, (call, reason) in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        info = error_info(caught.value)
        domain = next((d for word, d in domains.items() if what.startswith(word)), "strata.kv.v1")
        assert info.domain == domain, (what, info)
        assert reason is None or info.reason == reason, (what, info)


async def test_errors_come_back_with_their_code_and_error_info(gw_kv, admin_metadata, namespace):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"), metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert (info.reason, info.domain, info.metadata["key"]) == ("KEY_NOT_FOUND", "strata.kv.v1", "absent")


async def test_unknown_methods_are_unimplemented(gateway_channel, admin_metadata):
    call = gateway_channel.unary_unary(
        "/strata.kv.v1.KvService/Nope", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_stream_ends_with_deadline_exceeded_at_the_callers_deadline(gw_kv, admin_metadata, namespace):
    stream = gw_kv.Watch(
        kv_pb2.WatchRequest(namespace=namespace, prefix=""), metadata=admin_metadata, timeout=1.0
    )
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while True:
            await stream.read()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


async def test_the_service_still_answers_after_many_cancelled_streams(gw_kv, admin_metadata, namespace):
    for _ in range(20):
        stream = gw_kv.Watch(kv_pb2.WatchRequest(namespace=namespace, prefix=""), metadata=admin_metadata)
        assert (await stream.read()).created
        stream.cancel()
    # After cancellations the service still serves new calls promptly.
    await asyncio.wait_for(
        gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=admin_metadata), 5
    )


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer"),),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer sk_nope"),),
    ],
)
async def test_missing_or_invalid_keys_are_unauthenticated(gw_kv, namespace, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason in {"MISSING_API_KEY", "INVALID_API_KEY"}


async def test_a_well_formed_key_with_a_wrong_secret_is_unauthenticated(gw_kv, make_key, namespace):
    api_key, _ = await make_key("acme", "kv:read")
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(forged))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_without_the_scope_is_permission_denied(gw_kv, make_key, namespace):
    api_key, _ = await make_key("acme", "kv:read")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=bearer(api_key))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).metadata["scope"] == "kv:write"


async def test_admin_calls_need_the_admin_scope(gw_admin, make_key):
    api_key, _ = await make_key("acme", "kv:read", "kv:write")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=bearer(api_key))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_internal_key_check_cannot_be_called_through_the_gateway(
    gateway_channel, admin_metadata, stack
):
    # Not routed: even an operator's key finds no such method at the gateway.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await internal_pb2_grpc.ApiKeyAuthServiceStub(gateway_channel).AuthenticateApiKey(
            internal_pb2.AuthenticateApiKeyRequest(api_key=stack.api_key), metadata=admin_metadata
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_tenant_cannot_touch_another_tenants_namespace(gw_kv, make_key, namespace):
    key_a, _ = await make_key("tenant-one", "kv:read", "kv:write")
    key_b, _ = await make_key("tenant-two", "kv:read", "kv:write")
    await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"one's"), metadata=bearer(key_a))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(key_b))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await gw_kv.List(
        kv_pb2.ListRequest(namespace=namespace, include_total_size=True), metadata=bearer(key_b)
    )
    assert listed.total_size == 0
    await gw_kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix=""), metadata=bearer(key_b))
    got = await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(key_a))
    assert got.kv.value == b"one's"


async def test_forged_identity_metadata_from_a_caller_is_not_honoured(gw_kv, make_key, namespace):
    key_b, _ = await make_key("tenant-two", "kv:read", "kv:write")
    await gw_kv.Put(
        kv_pb2.PutRequest(namespace=namespace, key="k", value=b"mine"),
        metadata=bearer((await make_key("tenant-one", "kv:write"))[0]),
    )
    forged = sign_caller(
        b"not-the-secret-not-the-secret",
        "/strata.kv.v1.KvService/Get",
        Caller("tenant-one", frozenset({"kv:read"}), "x"),
        body=kv_pb2.GetRequest(namespace=namespace, key="k").SerializeToString(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(
            kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=bearer(key_b) + tuple(forged)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # served as tenant-two, not the forged tenant-one


async def test_forged_metadata_sent_straight_to_a_service_is_refused(stack, namespace):
    forged = sign_caller(
        b"guessed-secret-guessed-secret",
        "/strata.kv.v1.KvService/Get",
        Caller("tenant-one", frozenset({"admin"}), "x"),
        body=kv_pb2.GetRequest(namespace=namespace, key="k").SerializeToString(),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['kv']}") as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        for metadata in ((), tuple(forged), bearer(stack.api_key)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_stops_working_within_a_second(
    gw_kv, gw_admin, admin_metadata, make_key, namespace
):
    api_key, key_id = await make_key("acme", "kv:read")
    request = kv_pb2.ListRequest(namespace=namespace)
    await gw_kv.List(request, metadata=bearer(api_key))
    await gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin_metadata)
    revoked_at = time.monotonic()
    while True:
        try:
            await gw_kv.List(request, metadata=bearer(api_key))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - revoked_at < 1.5, "revoked key still worked after 1.5 s"
        await asyncio.sleep(0.05)
    assert time.monotonic() - revoked_at <= 1.2


async def test_rate_limit_answers_resource_exhausted_with_retry_delay(stack, make_key, namespace):
    process, port = await start_gateway(stack, STRATA_RATE_LIMIT_RPS="5", STRATA_RATE_LIMIT_BURST="5")
    try:
        api_key, _ = await make_key("acme", "kv:read")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            codes = []
            for _ in range(12):
                try:
                    await stub.List(kv_pb2.ListRequest(namespace=namespace), metadata=bearer(api_key))
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    limited = exc
            assert codes[:5] == [grpc.StatusCode.OK] * 5
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[5:]
            assert error_info(limited).reason == "RATE_LIMITED"
            from google.rpc import error_details_pb2

            from tests.support.errors import status_details

            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status_details(limited).details)
            assert 0 < retry.retry_delay.ToMilliseconds() <= 1000
            # Another key has its own bucket.
            other, _ = await make_key("acme", "kv:read")
            await stub.List(kv_pb2.ListRequest(namespace=namespace), metadata=bearer(other))
    finally:
        await stop_process(process)


async def test_rate_limits_fail_open_and_log_it_when_redis_is_unreachable(stack, make_key, namespace, capfd):
    # The gateway process writes its JSON logs to the stderr it inherits: capfd reads them.
    process, port = await start_gateway(
        stack, REDIS_URL="redis://127.0.0.1:1/0", STRATA_RATE_LIMIT_RPS="1", STRATA_RATE_LIMIT_BURST="1"
    )
    try:
        api_key, _ = await make_key("acme", "kv:read")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            for _ in range(5):
                await stub.List(kv_pb2.ListRequest(namespace=namespace), metadata=bearer(api_key))
    finally:
        await stop_process(process)
    logs = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert any(
        entry["service"] == "gateway"
        and entry["level"] == "WARNING"
        and entry["msg"] == "rate limits not enforced: redis unavailable"
        for entry in logs
    ), logs


async def test_gateway_health_follows_its_upstreams(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process, port = await start_gateway(stack, STRATA_KV_UPSTREAMS="127.0.0.1:1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while True:
                kv = await health.Check(health_pb2.HealthCheckRequest(service="strata.kv.v1.KvService"))
                if kv.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                assert time.monotonic() < deadline, "kv health never turned NOT_SERVING"
                await asyncio.sleep(0.2)
            admin = await health.Check(
                health_pb2.HealthCheckRequest(service="strata.admin.v1.OperationsService")
            )
            overall = await health.Check(health_pb2.HealthCheckRequest())
            assert admin.status == health_pb2.HealthCheckResponse.SERVING
            assert overall.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await stop_process(process)


async def test_calls_succeed_when_one_of_two_upstream_addresses_is_dead(stack, admin_metadata, namespace):
    # The dead address is a listener that hangs up on every connection, so the test sees the
    # gateway try it (a closed port would pass even if it never were).
    attempts = 0

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    dead = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    dead_port = dead.sockets[0].getsockname()[1]
    process, port = await start_gateway(
        stack, STRATA_KV_UPSTREAMS=f"127.0.0.1:{dead_port},127.0.0.1:{stack.ports['kv']}"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            for i in range(10):
                await stub.Put(
                    kv_pb2.PutRequest(namespace=namespace, key=f"k{i}", value=b"v"), metadata=admin_metadata
                )
            got = await stub.BatchGet(
                kv_pb2.BatchGetRequest(namespace=namespace, keys=[f"k{i}" for i in range(10)]),
                metadata=admin_metadata,
            )
    finally:
        await stop_process(process)
        dead.close()
    assert len(got.kvs) == 10
    assert attempts > 0, "the gateway never tried the dead address"


async def test_a_key_lookup_on_a_cache_miss_is_part_of_the_callers_trace(
    gw_kv, make_key, namespace, receiver
):
    api_key, _ = await make_key("acme", "kv:read")  # new: not in the gateway's key cache yet
    trace_id = uuid.uuid4().hex
    traceparent = ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
    await gw_kv.List(kv_pb2.ListRequest(namespace=namespace), metadata=(*bearer(api_key), traceparent))
    server, client = 2, 3  # span kinds
    lookup = "strata.internal.v1.ApiKeyAuthService/AuthenticateApiKey"
    wanted = {
        ("strata-gateway", server, "strata.kv.v1.KvService/List"),
        ("strata-gateway", client, lookup),
        ("strata-admin", server, lookup),
    }

    def spans_of(spans):
        return {(s.service, s.kind, s.name): s for s in spans if s.trace_id == trace_id}

    spans = spans_of(await receiver.wait_for(lambda spans: wanted <= spans_of(spans).keys(), timeout=20))
    root = spans["strata-gateway", server, "strata.kv.v1.KvService/List"]
    asked = spans["strata-gateway", client, lookup]
    answered = spans["strata-admin", server, lookup]
    assert asked.parent_span_id == root.span_id
    assert answered.parent_span_id == asked.span_id
    assert asked.attributes["rpc.grpc.status_code"] == 0


async def test_the_banners_grpcurl_hint_says_plaintext(stack):
    # The stack's gateway has no certificate: grpcurl needs -plaintext to reach it.
    hints = [line for line in stack.output if "grpcurl" in line]
    assert hints and all('grpcurl -plaintext -H "authorization: Bearer $(cat ' in h for h in hints), hints

"""Who may call the KV service directly: signed callers only, scoped, bound to their tenant."""

from __future__ import annotations

import grpc
import pytest
from strata.internal.v1 import internal_pb2, internal_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from shared.api.callers import Caller
from shared.rpc.identity import sign_caller
from tests.conftest import TENANT, TEST_INTERNAL_SECRET, signed_channel
from tests.support.errors import error_info

GET = "/strata.kv.v1.KvService/Get"
GET_BODY = kv_pb2.GetRequest(namespace="n", key="k").SerializeToString()  # what call_get sends


async def call_get(port: int, metadata) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv_pb2.GetRequest(namespace="n", key="k"), metadata=metadata)
    return caught.value


async def test_an_unsigned_call_is_unauthenticated(kv_server):
    error = await call_get(kv_server.port, ())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "UNAUTHENTICATED"


async def test_tenant_metadata_without_signature_is_unauthenticated(kv_server):
    forged = [
        (k, v)
        for k, v in sign_caller(TEST_INTERNAL_SECRET.encode(), GET, TENANT, body=GET_BODY)
        if k != "x-strata-signature"
    ]
    assert (await call_get(kv_server.port, forged)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_signature_made_with_another_secret_is_unauthenticated(kv_server):
    forged = sign_caller(b"guessed-secret-guessed-secret", GET, TENANT, body=GET_BODY)
    assert (await call_get(kv_server.port, forged)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_signature_for_another_tenant_cannot_be_edited(kv_server):
    signed = dict(sign_caller(TEST_INTERNAL_SECRET.encode(), GET, TENANT, body=GET_BODY))
    signed["x-strata-tenant"] = "tenant-b"
    assert (await call_get(kv_server.port, list(signed.items()))).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_signature_for_another_method_is_refused(kv_server):
    signed = sign_caller(TEST_INTERNAL_SECRET.encode(), "/strata.kv.v1.KvService/List", TENANT, body=GET_BODY)
    assert (await call_get(kv_server.port, signed)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_old_signature_is_refused(kv_server):
    import time

    stale = sign_caller(TEST_INTERNAL_SECRET.encode(), GET, TENANT, now=time.time() - 30, body=GET_BODY)
    assert (await call_get(kv_server.port, stale)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_signature_for_another_request_body_is_refused(kv_server):
    other = kv_pb2.GetRequest(namespace="n", key="another").SerializeToString()
    signed = sign_caller(TEST_INTERNAL_SECRET.encode(), GET, TENANT, body=other)
    assert (await call_get(kv_server.port, signed)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_read_only_caller_cannot_write(kv_server, namespace):
    reader = Caller("tenant-a", frozenset({"kv:read"}), "key-r")
    async with signed_channel(kv_server.port, reader) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).metadata["scope"] == "kv:write"
        assert error_info(caught.value).domain == "strata.kv.v1"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_tenant_purge_needs_the_internal_scope_which_no_operator_has(kv_server):
    # The scope is the one the proto declares, checked by the bootstrap before the servicer runs.
    operator = Caller("tenant-a", frozenset({"operator"}), "key-o")
    async with signed_channel(kv_server.port, operator) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await internal_pb2_grpc.TenantPurgeServiceStub(channel).PurgeTenant(
                internal_pb2.PurgeTenantRequest(tenant="tenant-a")
            )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(caught.value)
    assert (info.reason, info.metadata["scope"], info.domain) == (
        "MISSING_SCOPE",
        "internal",
        "strata.internal.v1",
    )


async def test_tenants_do_not_see_each_others_namespaces(kv, kv_server, namespace):
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="secret", value=b"tenant-a's"))
    other = Caller("tenant-b", frozenset({"kv:read", "kv:write"}), "key-b")
    async with signed_channel(kv_server.port, other) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(kv_pb2.GetRequest(namespace=namespace, key="secret"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.List(kv_pb2.ListRequest(namespace=namespace, include_total_size=True))
        assert listed.total_size == 0
        deleted = await stub.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix=""))
        assert deleted.deleted == 0
        await stub.Put(kv_pb2.PutRequest(namespace=namespace, key="secret", value=b"tenant-b's"))
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="secret"))
    assert got.kv.value == b"tenant-a's"

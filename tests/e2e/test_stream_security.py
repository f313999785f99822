"""Long-lived streams keep to their key: re-checked while open, limited per key and tenant,
never starving unary calls, and ended at a maximum age with a place to resume from.

All through real processes: the session stack (key cache TTL 1 s), and where a
setting must differ, one more gateway or kv process beside it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2

from tests.support.calls import bearer
from tests.support.errors import error_info
from tests.support.stack import start_gateway, start_process, stop_process

# The stack's key cache TTL is 1 s: a stream must end within it, plus a lookup and scheduling.
ENDS_WITHIN_S = 2.5


class OpenWatch:
    """A Watch read in the background: the events it got and how it ended."""

    def __init__(
        self, stub: kv_pb2_grpc.KvServiceStub, namespace: str, api_key: str, **request: object
    ) -> None:
        self.call = stub.Watch(
            kv_pb2.WatchRequest(namespace=namespace, prefix="", **request), metadata=bearer(api_key)
        )
        self.keys: list[str] = []
        self.headers: list[int] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.ended_at: float | None = None
        self.created = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                if response.created:
                    self.created.set()
                self.headers.append(response.header.revision)
                self.keys.extend(event.kv.key for event in response.events)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    async def started(self) -> OpenWatch:
        await asyncio.wait_for(self.created.wait(), 10)
        return self

    async def ended(self, within_s: float) -> grpc.aio.AioRpcError:
        await asyncio.wait_for(asyncio.shield(self.task), within_s)
        assert self.error is not None, "the stream ended without an error"
        return self.error


@pytest.fixture
def tenant_slug() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


async def test_a_watch_ends_within_the_key_ttl_once_its_key_is_revoked(
    gw_kv, gw_admin, admin_metadata, make_key, tenant_slug
):
    api_key, key_id = await make_key(tenant_slug, "kv:read", "kv:write")
    watch = await OpenWatch(gw_kv, "streams", api_key).started()
    await gw_kv.Put(
        kv_pb2.PutRequest(namespace="streams", key="before", value=b"1"), metadata=bearer(api_key)
    )

    await gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin_metadata)
    revoked_at = time.monotonic()
    error = await watch.ended(ENDS_WITHIN_S + 5)

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "INVALID_API_KEY"
    assert watch.ended_at is not None and watch.ended_at - revoked_at < ENDS_WITHIN_S
    assert "before" in watch.keys


async def test_a_watch_never_sees_the_writes_of_a_new_tenant_with_its_old_tenants_slug(
    gw_kv, gw_tenants, admin_metadata, make_key, tenant_slug
):
    old_key, _ = await make_key(tenant_slug, "kv:read")
    watch = await OpenWatch(gw_kv, "shared-name", old_key).started()

    await gw_tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=tenant_slug, cascade=True), metadata=admin_metadata
    )
    new_key, _ = await make_key(tenant_slug, "kv:read", "kv:write")  # the same slug, another tenant
    for number in range(20):
        await gw_kv.Put(
            kv_pb2.PutRequest(namespace="shared-name", key=f"new-tenant-{number}", value=b"secret"),
            metadata=bearer(new_key),
        )
        await asyncio.sleep(0.1)
        if watch.ended_at is not None:
            break

    error = await watch.ended(ENDS_WITHIN_S + 5)
    assert error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert not [key for key in watch.keys if key.startswith("new-tenant")], "another tenant's data"


async def test_a_watch_ends_with_permission_denied_when_its_tenant_is_suspended(
    gw_kv, gw_tenants, admin_metadata, make_key, tenant_slug
):
    api_key, _ = await make_key(tenant_slug, "kv:read")
    watch = await OpenWatch(gw_kv, "streams", api_key).started()

    await gw_tenants.UpdateTenant(
        tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(slug=tenant_slug, status=tenants_pb2.TENANT_STATUS_SUSPENDED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=admin_metadata,
    )
    error = await watch.ended(ENDS_WITHIN_S + 5)

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert error_info(error).reason == "TENANT_SUSPENDED", error.details()


async def test_streams_are_limited_per_key_and_per_tenant_with_a_reason(stack, make_key, tenant_slug):
    process, port = await start_gateway(stack, STRATA_STREAMS_PER_KEY="3", STRATA_STREAMS_PER_TENANT="5")
    watches: list[OpenWatch] = []
    try:
        first_key, _ = await make_key(tenant_slug, "kv:read")
        second_key, _ = await make_key(tenant_slug, "kv:read")
        other_tenant_key, _ = await make_key(f"{tenant_slug}-o", "kv:read")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            watches += [await OpenWatch(stub, "limits", first_key).started() for _ in range(3)]

            over_key = OpenWatch(stub, "limits", first_key)
            error = await over_key.ended(10)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "TOO_MANY_STREAMS"
            assert error_info(error).metadata["per"] == "api_key"

            watches += [await OpenWatch(stub, "limits", second_key).started() for _ in range(2)]
            over_tenant = OpenWatch(stub, "limits", second_key)
            error = await over_tenant.ended(10)
            assert error_info(error).metadata["per"] == "tenant"

            # Another tenant is not held back, and a closed stream frees its place.
            watches.append(await OpenWatch(stub, "limits", other_tenant_key).started())
            watches[0].call.cancel()
            await asyncio.sleep(0.3)
            watches.append(await OpenWatch(stub, "limits", first_key).started())
            assert all(w.error is None for w in watches[1:])
    finally:
        for watch in watches:
            watch.call.cancel()
        await stop_process(process)


async def test_idle_watches_of_one_key_never_starve_unary_calls(stack, make_key, tenant_slug):
    # More idle streams than one upstream connection carries (256): before, they took
    # every slot of the connection unary calls share, and each Get waited to its deadline.
    count = 300
    process, port = await start_gateway(
        stack, STRATA_STREAMS_PER_KEY=str(count), STRATA_STREAMS_PER_TENANT=str(count)
    )
    watches: list[OpenWatch] = []
    channels = [
        # Two connections to the gateway: one carries at most 256 streams too.
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    try:
        api_key, _ = await make_key(tenant_slug, "kv:read", "kv:write")
        stubs = [kv_pb2_grpc.KvServiceStub(channel) for channel in channels]
        watches = [OpenWatch(stubs[n % 2], "idle", api_key) for n in range(count)]
        await asyncio.wait_for(asyncio.gather(*(w.created.wait() for w in watches)), 60)

        await stubs[0].Put(
            kv_pb2.PutRequest(namespace="idle", key="k", value=b"v"), metadata=bearer(api_key), timeout=3
        )
        for _ in range(5):
            got = await stubs[1].Get(
                kv_pb2.GetRequest(namespace="idle", key="k"), metadata=bearer(api_key), timeout=2
            )
            assert got.kv.value == b"v"
        assert all(w.error is None for w in watches)
    finally:
        for watch in watches:
            watch.call.cancel()
        for channel in channels:
            await channel.close()
        await stop_process(process)


async def test_a_watch_ends_at_its_maximum_age_with_a_revision_to_resume_from(stack, make_key, tenant_slug):
    kv, kv_port = await start_process(stack, "kv", STRATA_STREAM_MAX_AGE_S="2")
    gateway, port = await start_gateway(stack, STRATA_KV_UPSTREAMS=f"127.0.0.1:{kv_port}")
    try:
        api_key, _ = await make_key(tenant_slug, "kv:read", "kv:write")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            opened = time.monotonic()
            watch = await OpenWatch(stub, "aged", api_key).started()
            await stub.Put(
                kv_pb2.PutRequest(namespace="aged", key="seen", value=b"1"), metadata=bearer(api_key)
            )

            error = await watch.ended(10)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(error)
            assert info.reason == "STREAM_MAX_AGE"
            assert 2 <= time.monotonic() - opened < 8
            assert watch.keys == ["seen"]

            # Resuming (through the gateway, so with the key checked again) loses and repeats nothing.
            await stub.Put(
                kv_pb2.PutRequest(namespace="aged", key="after", value=b"2"), metadata=bearer(api_key)
            )
            resumed = OpenWatch(stub, "aged", api_key, start_revision=int(info.metadata["resume_revision"]))
            await resumed.started()
            for _ in range(50):
                if resumed.keys:
                    break
                await asyncio.sleep(0.05)
            resumed.call.cancel()
            assert resumed.keys == ["after"]
    finally:
        await stop_process(gateway)
        await stop_process(kv)


async def test_a_backup_download_ends_once_its_admin_key_is_revoked(
    gw_admin, gw_kv, admin_metadata, make_key
):
    # More than the HTTP/2 windows of both hops hold, so the backup cannot all be in flight.
    namespace = f"backup-{uuid.uuid4().hex[:8]}"
    for number in range(24):
        await gw_kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key=f"v{number}", value=os.urandom(1024 * 1024)),
            metadata=admin_metadata,
        )
    try:
        # A slow reader: one chunk, then the key is revoked, then it reads on.
        api_key, key_id = await make_key("dev", "operator")
        stream = gw_admin.Backup(admin_pb2.BackupRequest(), metadata=bearer(api_key))
        first = await stream.read()
        assert first.data
        await gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin_metadata)
        await asyncio.sleep(ENDS_WITHIN_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                message = await stream.read()
                assert message is not grpc.aio.EOF, "the whole backup reached a revoked key"
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await gw_kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix=""), metadata=admin_metadata)

"""The whole of Strata (launcher, services, gateway as processes) with REDIS_URL naming a Redis Cluster.

Every Redis user is exercised through the gateway: the KV and record caches
(write-through, invalidation across processes with two kv processes), rate
limits, process stats and the slow-query log read by admin, a tenant delete
invalidating its entries, and admin's health of the cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from tests.chaos import provision_tenant
from tests.support.calls import AdminStubs, bearer
from tests.support.stack import Stack, remove_data, start_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def on_cluster(settings, redis_cluster) -> AsyncIterator[Stack]:
    stack = await start_stack(
        replace(settings, redis_url=redis_cluster.url),
        STRATA_KV_REPLICAS="2",
        STRATA_RATE_LIMIT_RPS="20",
        STRATA_RATE_LIMIT_BURST="20",
        STRATA_SLOW_QUERY_MS="0",  # every statement is "slow": the log has entries at once
    )
    yield stack
    await stack.stop()
    remove_data(stack)


@pytest.fixture(scope="module")
async def channel(on_cluster) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(on_cluster.gateway) as opened:
        yield opened


async def test_kv_reads_its_writes_through_both_processes_and_records_are_cached(on_cluster, channel):
    metadata = await provision_tenant(on_cluster, f"c-{uuid.uuid4().hex[:6]}")
    kv = kv_pb2_grpc.KvServiceStub(channel)
    namespace = "cluster"
    for i in range(4):
        await kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key="k", value=str(i).encode()), metadata=metadata
        )
        got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=metadata)
        assert got.kv.value == str(i).encode()
    records = tenants_pb2_grpc.RecordServiceStub(channel)
    made = await records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=tenants_pb2.Record(collection="c", id="r1")), metadata=metadata
    )
    fetched = await records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="c", id="r1"), metadata=metadata
    )
    assert fetched.record.etag == made.record.etag


async def test_rate_limits_hold_on_the_cluster(on_cluster, channel):
    metadata = await provision_tenant(on_cluster, f"l-{uuid.uuid4().hex[:6]}")
    kv = kv_pb2_grpc.KvServiceStub(channel)
    codes = []
    for _ in range(40):  # past the burst of 20
        try:
            await kv.Get(kv_pb2.GetRequest(namespace="n", key="absent"), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


async def test_admin_sees_the_cluster_the_processes_and_the_slow_queries(on_cluster, channel):
    admin = AdminStubs(channel)
    for _ in range(10):
        health = await admin.GetSystemHealth(
            admin_pb2.GetSystemHealthRequest(), metadata=bearer(on_cluster.api_key)
        )
        if len([p for p in health.processes if p.component == "kv"]) == 2:
            break
        await asyncio.sleep(0.5)
    assert health.redis.reachable and health.redis.version
    assert len([p for p in health.processes if p.component == "kv"]) == 2
    stats = await admin.GetDatabaseStats(
        admin_pb2.GetDatabaseStatsRequest(limit=5), metadata=bearer(on_cluster.api_key)
    )
    assert stats.slow_queries


async def test_a_tenant_delete_invalidates_its_cached_records(on_cluster, channel):
    slug = f"d-{uuid.uuid4().hex[:6]}"
    metadata = await provision_tenant(on_cluster, slug)
    records = tenants_pb2_grpc.RecordServiceStub(channel)
    await records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=tenants_pb2.Record(collection="c", id="gone")),
        metadata=metadata,
    )
    await records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="c", id="gone"), metadata=metadata
    )  # cached
    tenants = tenants_pb2_grpc.TenantServiceStub(channel)
    await tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=bearer(on_cluster.api_key)
    )
    await tenants.CreateTenant(
        tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug)),
        metadata=bearer(on_cluster.api_key),
    )
    made = await AdminStubs(channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=slug, name="again", scopes=["tenants:read"]),
        metadata=bearer(on_cluster.api_key),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="c", id="gone"),
            metadata=(("authorization", f"Bearer {made.api_key}"),),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

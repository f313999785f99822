"""Read-your-writes through the gateway, with real streaming replicas whose replay is paused.

A Strata (launcher, services, gateway as processes) runs against an embedded
primary with two streaming replicas (DATABASE_READ_URLS). With replay paused
on both, the replicas hold an old snapshot: a caller that wrote must still
read its write (the gateway adds its consistency token, the service then
reads from the primary), while another API key's reads, served by the
replicas, show that they are indeed behind.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from devstack.backends import Backends
from shared.storage.consistency import TOKEN_KEY
from tests.support.calls import AdminStubs, bearer
from tests.support.replicas import pause_replay, replicated_backends, resume_replay, wait_replayed
from tests.support.stack import Stack, grpcurl, remove_data, start_stack

SCOPES = ("kv:read", "kv:write", "tenants:read", "tenants:write", "vector:read", "vector:write")


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Backends]:
    async with replicated_backends(Path(tmp_path_factory.mktemp("replicated-e2e")), replicas=2) as backends:
        yield backends


@pytest.fixture(scope="module")
async def replicated(cluster: Backends, settings) -> AsyncIterator[Stack]:
    stack = await start_stack(
        replace(
            settings,
            database_url=cluster.database_url,
            redis_url=cluster.redis_url,
            migrate_database_url=cluster.migrate_database_url,
        ),
        None,
        DATABASE_READ_URLS=",".join(cluster.database_read_urls),
        STRATA_REPLICA_PROBE_INTERVAL_S="0.05",
    )
    yield stack
    await stack.stop()
    remove_data(stack)


@pytest.fixture(scope="module")
async def channel(replicated: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(replicated.gateway) as opened:
        yield opened


@pytest.fixture(scope="module")
async def two_keys(replicated: Stack, channel) -> tuple[str, str, str]:
    """A fresh tenant and two API keys of it (two callers): (tenant, key A, key B)."""
    tenant = f"r-{uuid.uuid4().hex[:8]}"
    admin = bearer(replicated.api_key)
    await tenants_pb2_grpc.TenantServiceStub(channel).CreateTenant(
        tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=tenant)), metadata=admin
    )
    keys = []
    for name in ("a", "b"):
        made = await AdminStubs(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=tenant, name=name, scopes=list(SCOPES)), metadata=admin
        )
        keys.append(made.api_key)
    return tenant, keys[0], keys[1]


@pytest.fixture
async def paused(cluster: Backends) -> AsyncIterator[None]:
    """Both replicas caught up with everything so far, then frozen there."""
    for replica in cluster.replicas:
        await wait_replayed(replica.urls.owner, cluster.migrate_database_url)
        await pause_replay(replica.urls.owner)
    try:
        yield
    finally:
        for replica in cluster.replicas:
            await resume_replay(replica.urls.owner)


async def test_a_grpcurl_user_reads_its_own_put_while_the_replicas_lag(replicated, two_keys, paused):
    _, key_a, key_b = two_keys
    namespace = f"ryw-{uuid.uuid4().hex[:6]}"
    put = {"namespace": namespace, "key": "k", "value": "djE="}
    code, out = await grpcurl(replicated, "strata.kv.v1.KvService/Put", put, "-v", api_key=key_a)
    assert code == 0, out
    assert TOKEN_KEY in out  # the write's consistency token, in its trailers
    code, out = await grpcurl(
        replicated, "strata.kv.v1.KvService/List", {"namespace": namespace}, api_key=key_a
    )
    assert code == 0, out
    assert [kv["key"] for kv in json.loads(out)["kvs"]] == ["k"]
    # Another caller's List is served by the paused replicas: they have not replayed the Put.
    code, out = await grpcurl(
        replicated, "strata.kv.v1.KvService/List", {"namespace": namespace}, api_key=key_b
    )
    assert code == 0, out
    assert json.loads(out).get("kvs", []) == []


async def test_a_token_passed_by_hand_gives_another_caller_the_same_guarantee(
    replicated, channel, two_keys, paused
):
    _, key_a, key_b = two_keys
    kv = kv_pb2_grpc.KvServiceStub(channel)
    namespace = f"hand-{uuid.uuid4().hex[:6]}"
    call = kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=bearer(key_a))
    await call
    token = dict(await call.trailing_metadata())[TOKEN_KEY]
    listed = await kv.List(
        kv_pb2.ListRequest(namespace=namespace), metadata=(*bearer(key_b), (TOKEN_KEY, token))
    )
    assert [item.key for item in listed.kvs] == ["k"]


async def test_a_malformed_token_is_invalid_argument(channel, two_keys):
    _, key_a, _ = two_keys
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv_pb2_grpc.KvServiceStub(channel).List(
            kv_pb2.ListRequest(namespace="any"), metadata=(*bearer(key_a), (TOKEN_KEY, "0/1' OR 1=1"))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert TOKEN_KEY in (caught.value.details() or "")


async def test_records_and_vectors_read_their_own_writes_while_the_replicas_lag(channel, two_keys, paused):
    _, key_a, key_b = two_keys
    records = tenants_pb2_grpc.RecordServiceStub(channel)
    data = struct_pb2.Struct()
    data.update({"status": "open"})
    collection = f"c{uuid.uuid4().hex[:6]}"
    await records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=tenants_pb2.Record(collection=collection, id="r1", data=data)),
        metadata=bearer(key_a),
    )
    mine = await records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection=collection), metadata=bearer(key_a)
    )
    assert [r.id for r in mine.records] == ["r1"]
    theirs = await records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection=collection), metadata=bearer(key_b)
    )
    assert list(theirs.records) == []

    vectors = vector_pb2_grpc.VectorServiceStub(channel)
    name = f"v{uuid.uuid4().hex[:6]}"
    await vectors.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name=name, dimension=3, metric=vector_pb2.METRIC_COSINE)
        ),
        metadata=bearer(key_a),
    )
    await vectors.UpsertPoints(
        vector_pb2.UpsertPointsRequest(
            collection=name, points=[vector_pb2.Point(id="p1", vector=vector_pb2.Vector(values=[1, 0, 0]))]
        ),
        metadata=bearer(key_a),
    )
    found = await vectors.Search(
        vector_pb2.SearchRequest(collection=name, vector=vector_pb2.Vector(values=[1, 0, 0]), limit=1),
        metadata=bearer(key_a),
    )
    assert [hit.id for hit in found.hits] == ["p1"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the replicas do not know the collection yet
        await vectors.Search(
            vector_pb2.SearchRequest(collection=name, vector=vector_pb2.Vector(values=[1, 0, 0]), limit=1),
            metadata=bearer(key_b),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_admin_health_shows_each_replica(replicated, channel, cluster, paused):
    admin = AdminStubs(channel)
    replicas = {f"127.0.0.1:{r.port}" for r in cluster.replicas}
    deadline = time.monotonic() + 10
    while True:
        health = await admin.GetSystemHealth(
            admin_pb2.GetSystemHealthRequest(), metadata=bearer(replicated.api_key)
        )
        if {r.address for r in health.replicas} == replicas and all(
            r.state == "paused" for r in health.replicas
        ):
            break
        assert time.monotonic() < deadline, health.replicas
        await asyncio.sleep(0.1)
    for replica in health.replicas:
        assert replica.breaker == "closed" and "/" in replica.replay_lsn and replica.error == ""
    assert health.status == admin_pb2.SERVING_STATUS_SERVING


async def test_once_replay_resumes_the_other_caller_sees_the_write(replicated, cluster, channel, two_keys):
    _, key_a, key_b = two_keys
    kv = kv_pb2_grpc.KvServiceStub(channel)
    namespace = f"later-{uuid.uuid4().hex[:6]}"
    await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"), metadata=bearer(key_a))
    for replica in cluster.replicas:
        await wait_replayed(replica.urls.owner, cluster.migrate_database_url)
    deadline = time.monotonic() + 5
    while not (await kv.List(kv_pb2.ListRequest(namespace=namespace), metadata=bearer(key_b))).kvs:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

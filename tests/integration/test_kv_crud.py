"""KvService reads and writes against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from strata.kv.v1 import kv_pb2

from tests.integration.test_kv_bad_input import store_revision, writes_since
from tests.support.errors import error_info


async def put(kv, namespace: str, key: str, value: bytes = b"v", **fields) -> kv_pb2.PutResponse:
    return await kv.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=value, **fields))


async def test_put_returns_metadata_of_a_new_key(kv, namespace):
    response = await put(kv, namespace, "k", b"hello", content_type="text/plain")
    assert response.kv.create_revision == response.kv.mod_revision == response.header.revision
    assert response.kv.version == 1
    assert response.kv.content_type == "text/plain"
    assert not response.HasField("previous")


async def test_get_returns_value_and_content_type(kv, namespace):
    await put(kv, namespace, "k", b"\x00\xffbinary", content_type="application/octet-stream")
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"\x00\xffbinary"
    assert got.kv.content_type == "application/octet-stream"
    assert got.kv.namespace == namespace
    assert got.header.revision >= got.kv.mod_revision


async def test_replacing_a_key_keeps_create_revision_and_bumps_version(kv, namespace):
    first = await put(kv, namespace, "k", b"1")
    second = await put(kv, namespace, "k", b"2")
    assert second.kv.create_revision == first.kv.create_revision
    assert second.kv.mod_revision > first.kv.mod_revision
    assert second.kv.version == 2
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"2"


async def test_every_write_gets_a_new_higher_revision(kv, namespace):
    revisions = [(await put(kv, namespace, f"k{i}")).header.revision for i in range(5)]
    assert revisions == sorted(set(revisions))


async def test_get_of_absent_key_is_not_found_with_reason(kv, namespace):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "KEY_NOT_FOUND"
    assert info.domain == "strata.kv.v1"
    assert info.metadata["key"] == "missing"


async def test_namespaces_are_isolated(kv, namespace):
    await put(kv, namespace, "shared-key", b"mine")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Get(kv_pb2.GetRequest(namespace=namespace + "-other", key="shared-key"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_return_previous_gives_the_replaced_value(kv, namespace):
    await put(kv, namespace, "k", b"old", content_type="a/b")
    response = await put(kv, namespace, "k", b"new", return_previous=True)
    assert response.previous.value == b"old"
    assert response.previous.content_type == "a/b"
    assert response.previous.version == 1


async def test_put_if_revision_zero_creates_only_when_absent(kv, namespace):
    created = await put(kv, namespace, "k", b"first", if_revision=0)
    assert created.kv.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(kv, namespace, "k", b"second", if_revision=0)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert info.reason == "REVISION_MISMATCH"
    assert info.metadata["current_revision"] == str(created.kv.mod_revision)
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"first"


async def test_put_if_revision_matching_writes(kv, namespace):
    first = await put(kv, namespace, "k", b"1")
    second = await put(kv, namespace, "k", b"2", if_revision=first.kv.mod_revision)
    assert second.kv.version == 2


async def test_put_if_revision_mismatch_writes_nothing_and_keeps_store_revision(kv, settings, namespace):
    first = await put(kv, namespace, "k", b"1")
    before = await store_revision(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(kv, namespace, "k", b"2", if_revision=first.kv.mod_revision + 1000)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    metadata = error_info(caught.value).metadata
    assert metadata["expected_revision"] == str(first.kv.mod_revision + 1000)
    assert metadata["current_revision"] == str(first.kv.mod_revision)
    assert int(metadata["store_revision"]) >= before
    assert await writes_since(settings, before) == 0
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"1" and got.kv.mod_revision == first.kv.mod_revision


async def test_batch_get_returns_found_in_request_order_and_lists_missing(kv, namespace):
    await put(kv, namespace, "a", b"A")
    await put(kv, namespace, "c", b"C")
    response = await kv.BatchGet(kv_pb2.BatchGetRequest(namespace=namespace, keys=["c", "b", "a", "c"]))
    assert [(k.key, k.value) for k in response.kvs] == [("c", b"C"), ("a", b"A")]
    assert list(response.missing_keys) == ["b"]


async def test_batch_put_writes_all_keys_at_one_revision(kv, namespace):
    items = [kv_pb2.BatchPutItem(key=f"k{i}", value=str(i).encode()) for i in range(10)]
    response = await kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))
    assert {k.mod_revision for k in response.kvs} == {response.header.revision}
    assert [k.key for k in response.kvs] == [f"k{i}" for i in range(10)]
    got = await kv.BatchGet(kv_pb2.BatchGetRequest(namespace=namespace, keys=[f"k{i}" for i in range(10)]))
    assert [k.value for k in got.kvs] == [str(i).encode() for i in range(10)]


async def test_batch_put_with_one_failed_compare_writes_nothing(kv, namespace):
    await put(kv, namespace, "exists", b"old")
    items = [
        kv_pb2.BatchPutItem(key="new1", value=b"x"),
        kv_pb2.BatchPutItem(key="exists", value=b"y", if_revision=0),
        kv_pb2.BatchPutItem(key="new2", value=b"z"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).metadata["key"] == "exists"
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace))
    assert [(k.key, k.value) for k in listed.kvs] == [("exists", b"old")]


@pytest.mark.parametrize("written", ["all", "none", "last"])
@pytest.mark.parametrize("keys", [["ab", "a"], ["a", "ab"], ["z", "m", "a"], ["k3", "k1", "k2"]])
async def test_batch_put_names_the_first_failed_compare_in_request_order(kv, namespace, keys, written):
    for key in {"all": keys, "none": [], "last": keys[-1:]}[written]:
        await put(kv, namespace, key, b"old")
    # Every item is stale; the answer names the first of them as sent, whatever the key order.
    items = [kv_pb2.BatchPutItem(key=key, value=b"new", if_revision=10**12) for key in keys]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))
    assert error_info(caught.value).metadata["key"] == keys[0]


async def test_delete_one_key_reports_one_and_removes_it(kv, namespace):
    await put(kv, namespace, "k")
    response = await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="k"))
    assert response.deleted == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_of_absent_key_deletes_nothing_and_keeps_revision(kv, settings, namespace):
    await put(kv, namespace, "other")
    before = await store_revision(settings)
    response = await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="absent"))
    assert response.deleted == 0
    # A delete that finds nothing takes no revision: it answers the current one.
    assert await writes_since(settings, before) == 0
    assert response.header.revision >= before
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace))
    assert [k.key for k in listed.kvs] == ["other"]


async def test_delete_prefix_removes_only_keys_under_it(kv, namespace):
    for key in ["a/1", "a/2", "a/3", "ab", "b/1"]:
        await put(kv, namespace, key)
    response = await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix="a/", return_previous=True))
    assert response.deleted == 3
    assert sorted(k.key for k in response.previous) == ["a/1", "a/2", "a/3"]
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace))
    assert [k.key for k in listed.kvs] == ["ab", "b/1"]


async def test_delete_if_revision_mismatch_keeps_the_key(kv, settings, namespace):
    written = await put(kv, namespace, "k")
    before = await store_revision(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Delete(
            kv_pb2.DeleteRequest(namespace=namespace, key="k", if_revision=written.kv.mod_revision + 1)
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert info.reason == "REVISION_MISMATCH"
    assert info.metadata["current_revision"] == str(written.kv.mod_revision)
    assert info.metadata["expected_revision"] == str(written.kv.mod_revision + 1)
    assert await writes_since(settings, before) == 0
    ok = await kv.Delete(
        kv_pb2.DeleteRequest(namespace=namespace, key="k", if_revision=written.kv.mod_revision)
    )
    assert ok.deleted == 1


async def test_delete_return_previous_gives_the_value(kv, namespace):
    await put(kv, namespace, "k", b"gone")
    response = await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="k", return_previous=True))
    assert [k.value for k in response.previous] == [b"gone"]


async def test_a_deleted_key_put_again_starts_a_new_incarnation(kv, namespace):
    first = await put(kv, namespace, "k")
    await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key="k"))
    again = await put(kv, namespace, "k")
    assert again.kv.version == 1
    assert again.kv.create_revision > first.kv.create_revision


async def test_key_with_ttl_reads_until_it_expires(kv, namespace):
    response = await put(kv, namespace, "k", b"short", ttl=duration_pb2.Duration(nanos=400_000_000))
    assert response.kv.HasField("expire_time")
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert got.kv.value == b"short"
    await asyncio.sleep(0.6)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_total_size=True))
    assert list(listed.kvs) == [] and listed.total_size == 0
    batch = await kv.BatchGet(kv_pb2.BatchGetRequest(namespace=namespace, keys=["k"]))
    assert list(batch.missing_keys) == ["k"]


async def test_expired_key_counts_as_absent_for_compare_and_set(kv, namespace):
    await put(kv, namespace, "k", ttl=duration_pb2.Duration(nanos=200_000_000))
    await asyncio.sleep(0.3)
    recreated = await put(kv, namespace, "k", b"again", if_revision=0)
    assert recreated.kv.version == 1


async def test_get_has_an_expire_time_for_a_key_with_a_ttl_and_none_without(kv, namespace):
    started = time.time()
    with_ttl = await put(kv, namespace, "expiring", ttl=duration_pb2.Duration(seconds=3600))
    finished = time.time()
    await put(kv, namespace, "forever")
    for _ in range(2):  # the first read fills the cache, the second may come from it
        got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="expiring"))
        assert got.kv.HasField("expire_time")
        assert got.kv.expire_time == with_ttl.kv.expire_time
        # Postgres's clock set it; it shares this machine's.
        assert started + 3600 - 5 <= got.kv.expire_time.ToNanoseconds() / 1e9 <= finished + 3600 + 5
        plain = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="forever"))
        assert not plain.kv.HasField("expire_time")


async def test_put_without_ttl_clears_an_earlier_ttl(kv, namespace):
    await put(kv, namespace, "k", ttl=duration_pb2.Duration(seconds=60))
    response = await put(kv, namespace, "k", b"forever")
    assert not response.kv.HasField("expire_time")

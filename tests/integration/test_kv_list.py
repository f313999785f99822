"""KvService.List: order, ranges, pages, tokens."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from strata.kv.v1 import kv_pb2

from tests.support.errors import field_violations


async def fill(kv, namespace: str, keys: list[str]) -> None:
    items = [kv_pb2.BatchPutItem(key=k, value=k.encode()) for k in keys]
    await kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))


async def list_all(kv, request: kv_pb2.ListRequest) -> list[str]:
    keys: list[str] = []
    while True:
        page = await kv.List(request)
        keys.extend(k.key for k in page.kvs)
        if not page.next_page_token:
            return keys
        request.page_token = page.next_page_token


async def test_list_orders_keys_by_code_point(kv, namespace):
    keys = ["b", "a", "B", "é", "z", "日本", "a/b", "a0", "\U0001f600"]
    await fill(kv, namespace, keys)
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace))
    assert [k.key for k in page.kvs] == sorted(keys)
    assert [k.value for k in page.kvs] == [k.encode() for k in sorted(keys)]


async def test_list_by_prefix(kv, namespace):
    await fill(kv, namespace, ["app/1", "app/2", "apple", "b"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, prefix="app/"))
    assert [k.key for k in page.kvs] == ["app/1", "app/2"]


async def test_list_by_key_range_is_half_open(kv, namespace):
    await fill(kv, namespace, ["a", "b", "c", "d"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, start_key="b", end_key="d"))
    assert [k.key for k in page.kvs] == ["b", "c"]


async def test_list_keys_only_leaves_values_out(kv, namespace):
    await fill(kv, namespace, ["a", "b"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, keys_only=True))
    assert [(k.key, k.value) for k in page.kvs] == [("a", b""), ("b", b"")]
    assert all(k.mod_revision > 0 for k in page.kvs)


async def test_list_pages_through_every_key_once_with_count(kv, namespace):
    keys = [f"k{i:03d}" for i in range(25)]
    await fill(kv, namespace, keys)
    request = kv_pb2.ListRequest(namespace=namespace, page_size=10, include_total_size=True)
    first = await kv.List(request)
    assert len(first.kvs) == 10 and first.total_size == 25 and first.next_page_token
    assert await list_all(kv, kv_pb2.ListRequest(namespace=namespace, page_size=10)) == keys


async def test_last_page_has_no_token(kv, namespace):
    await fill(kv, namespace, ["a", "b"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, page_size=2))
    assert len(page.kvs) == 2 and page.next_page_token == ""


async def test_pagination_under_concurrent_inserts_neither_skips_nor_repeats(kv, namespace):
    original = [f"k{i:04d}" for i in range(0, 400, 2)]
    await fill(kv, namespace, original)
    stop = asyncio.Event()

    async def writer() -> None:
        i = 1
        while not stop.is_set():
            await kv.Put(kv_pb2.PutRequest(namespace=namespace, key=f"k{i:04d}", value=b"new"))
            i = (i + 2) % 400

    task = asyncio.create_task(writer())
    try:
        seen = await list_all(kv, kv_pb2.ListRequest(namespace=namespace, page_size=7))
    finally:
        stop.set()
        await task
    assert len(seen) == len(set(seen)), "a key was returned twice"
    assert set(original) <= set(seen), "a key that existed throughout was skipped"
    assert seen == sorted(seen)


async def test_page_token_from_another_query_is_rejected(kv, namespace):
    await fill(kv, namespace, ["a", "b", "c"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.List(
            kv_pb2.ListRequest(namespace=namespace, prefix="a", page_size=1, page_token=page.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.List(
            kv_pb2.ListRequest(namespace=namespace + "x", page_size=1, page_token=page.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("token", ["garbage", "!!!", "eyJ2IjoxfQ", "A" * 5000])
async def test_malformed_page_token_is_invalid_argument(kv, namespace, token):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.List(kv_pb2.ListRequest(namespace=namespace, page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(caught.value)


async def test_edited_page_token_is_invalid_argument(kv, namespace):
    await fill(kv, namespace, ["a", "b", "c"])
    page = await kv.List(kv_pb2.ListRequest(namespace=namespace, page_size=1))
    token = page.next_page_token
    edited = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.List(kv_pb2.ListRequest(namespace=namespace, page_size=1, page_token=edited))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("size", [-1, 1001])
async def test_page_size_out_of_range_is_invalid_argument(kv, namespace, size):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.List(kv_pb2.ListRequest(namespace=namespace, page_size=size))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in field_violations(caught.value)

"""Malformed, oversized and hostile input: a clear status, details, and nothing written."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from strata.kv.v1 import kv_pb2

from tests.helpers import error_info, field_violations

HOSTILE_STRINGS = [
    "'; DROP TABLE kv.entries; --",
    '" OR 1=1 --',
    "$1",
    "%_\\",
    "\u202e\u200b",
    "../../etc/passwd",
]


async def assert_invalid(call, request, *fields: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    for field in fields:
        assert field in violations, f"{field} not in {violations}"
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("namespace", "key", "fields"),
    [
        ("", "k", ["namespace"]),
        ("bad namespace", "k", ["namespace"]),
        ("-leading-dash", "k", ["namespace"]),
        ("n" * 129, "k", ["namespace"]),
        ("ok", "", ["key"]),
        ("ok", "a\x00b", ["key"]),
        ("ok", "k" * 4097, ["key"]),
        ("ok", "é" * 2049, ["key"]),  # 4098 bytes in UTF-8
        ("", "", ["namespace", "key"]),
    ],
)
async def test_bad_names_are_rejected_on_every_keyed_call(kv, namespace, key, fields):
    await assert_invalid(kv.Get, kv_pb2.GetRequest(namespace=namespace, key=key), *fields)
    await assert_invalid(kv.Put, kv_pb2.PutRequest(namespace=namespace, key=key, value=b"v"), *fields)
    await assert_invalid(kv.Delete, kv_pb2.DeleteRequest(namespace=namespace, key=key), *fields)


async def test_value_over_the_limit_is_rejected_and_not_written(kv, namespace):
    await assert_invalid(
        kv.Put, kv_pb2.PutRequest(namespace=namespace, key="big", value=b"x" * (1024 * 1024 + 1)), "value"
    )
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_count=True))
    assert listed.total_count == 0


async def test_value_at_the_limit_is_accepted(kv, namespace):
    response = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="big", value=b"x" * (1024 * 1024)))
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="big"))
    assert len(got.kv.value) == 1024 * 1024 and got.kv.mod_revision == response.header.revision


async def test_negative_ttl_is_rejected(kv, namespace):
    request = kv_pb2.PutRequest(
        namespace=namespace, key="k", value=b"v", ttl=duration_pb2.Duration(seconds=-1)
    )
    await assert_invalid(kv.Put, request, "ttl")


async def test_negative_if_revision_is_rejected(kv, namespace):
    await assert_invalid(
        kv.Put, kv_pb2.PutRequest(namespace=namespace, key="k", if_revision=-5), "if_revision"
    )


async def test_content_type_with_control_characters_is_rejected(kv, namespace):
    request = kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v", content_type="text/plain\r\nX: y")
    await assert_invalid(kv.Put, request, "content_type")


async def test_batch_put_reports_every_bad_item_by_index_and_writes_nothing(kv, namespace):
    items = [
        kv_pb2.BatchPutItem(key="good", value=b"v"),
        kv_pb2.BatchPutItem(key="", value=b"v"),
        kv_pb2.BatchPutItem(key="dup", value=b"v"),
        kv_pb2.BatchPutItem(key="dup", value=b"v"),
        kv_pb2.BatchPutItem(key="neg", value=b"v", ttl=duration_pb2.Duration(seconds=-3)),
    ]
    await assert_invalid(
        kv.BatchPut,
        kv_pb2.BatchPutRequest(namespace=namespace, items=items),
        "items[1].key",
        "items[3].key",
        "items[4].ttl",
    )
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_count=True))
    assert listed.total_count == 0


async def test_empty_and_oversized_batches_are_rejected(kv, namespace):
    await assert_invalid(kv.BatchPut, kv_pb2.BatchPutRequest(namespace=namespace), "items")
    await assert_invalid(kv.BatchGet, kv_pb2.BatchGetRequest(namespace=namespace), "keys")
    keys = [f"k{i}" for i in range(1001)]
    await assert_invalid(kv.BatchGet, kv_pb2.BatchGetRequest(namespace=namespace, keys=keys), "keys")


async def test_delete_needs_a_target_and_prefix_cannot_compare(kv, namespace):
    await assert_invalid(kv.Delete, kv_pb2.DeleteRequest(namespace=namespace), "key")
    await assert_invalid(
        kv.Delete, kv_pb2.DeleteRequest(namespace=namespace, prefix="a", if_revision=1), "if_revision"
    )


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
async def test_sql_metacharacters_are_plain_data(kv, namespace, hostile):
    await kv.Put(
        kv_pb2.PutRequest(namespace=namespace, key=hostile, value=hostile.encode(), content_type="x/y")
    )
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key=hostile))
    assert got.kv.value == hostile.encode()
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, prefix=hostile))
    assert [k.key for k in listed.kvs] == [hostile]
    deleted = await kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix=hostile))
    assert deleted.deleted == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # not protobuf at all
        b"\x0a\x05ab",  # length says 5, only 2 bytes follow (truncated)
        b"\x0a\x02\xff\xfe\x12\x01k",  # namespace is not valid UTF-8
        b"\x12\x03\xc3\x28k\x0a\x02ns",  # key is not valid UTF-8
    ],
)
async def test_undecodable_request_bytes_are_invalid_argument(kv_channel, payload):
    raw_put = kv_channel.unary_unary(
        "/strata.kv.v1.KvService/Put", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_put(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in field_violations(caught.value)


async def test_message_over_the_server_limit_is_resource_exhausted(kv, namespace, settings):
    request = kv_pb2.PutRequest(namespace=namespace, key="k", value=b"x" * (settings.max_message_bytes + 10))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Put(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_expired_deadline_is_deadline_exceeded_and_writes_nothing(kv, namespace):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="late", value=b"v"), timeout=0.000001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_count=True))
    assert listed.total_count == 0


async def test_unknown_method_is_unimplemented(kv_channel):
    call = kv_channel.unary_unary(
        "/strata.kv.v1.KvService/Nope", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

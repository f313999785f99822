"""Malformed, oversized and hostile input: a clear status, details, and nothing written."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from strata.kv.v1 import kv_pb2

from shared.config.settings import Settings
from tests.support.calls import assert_invalid, rpc_error
from tests.support.errors import error_info, field_violations

HOSTILE_STRINGS = [
    "'; DROP TABLE kv.entries; --",
    '" OR 1=1 --',
    "$1",
    "%_\\",
    "\u202e\u200b",
    "../../etc/passwd",
]


# -- the store, as its owner sees it --------------------------------------------------


async def store_revision(settings: Settings) -> int:
    """The KV store's revision (``kv.store_revision``), read straight from Postgres."""
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        return int(await conn.fetchval("SELECT current FROM kv.store_revision"))
    finally:
        await conn.close()


async def writes_since(settings: Settings, revision: int) -> int:
    """Revisions handed out after ``revision``, except the expiry sweeper's.

    The sweeper may remove another test's expired keys at any moment; each of
    its revisions logs expiries (kind 3) and nothing else, so they are told
    apart from any write a call could have made.
    """
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT s.current - $1 - (SELECT count(DISTINCT c.revision) FROM kv.changes c "
                "WHERE c.revision > $1 AND c.kind = 3) FROM kv.store_revision s",
                revision,
            )
        )
    finally:
        await conn.close()


async def stored(settings: Settings, entries: Iterable[tuple[str | bytes, str | bytes]]) -> list[str]:
    """Those of ``entries`` (namespace, key) any tenant has, compared as UTF-8 bytes (NUL is fine)."""
    pairs = [(_utf8(namespace), _utf8(key)) for namespace, key in entries]
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        rows = await conn.fetch(
            "SELECT e.namespace, e.key FROM kv.entries e "
            "JOIN unnest($1::bytea[], $2::bytea[]) AS w(namespace, key) "
            "ON convert_to(e.namespace, 'UTF8') = w.namespace AND convert_to(e.key, 'UTF8') = w.key",
            [namespace for namespace, _ in pairs],
            [key for _, key in pairs],
        )
    finally:
        await conn.close()
    return [f"{row['namespace']}/{row['key']}" for row in rows]


def _utf8(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


async def assert_nothing_written(
    settings: Settings, before: int, *entries: tuple[str | bytes, str | bytes]
) -> None:
    """The store revision has not moved since ``before`` and no (namespace, key) of ``entries`` exists."""
    assert await writes_since(settings, before) == 0, "a rejected call moved the store revision"
    assert await stored(settings, entries) == []


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
async def test_bad_names_are_rejected_on_every_keyed_call(kv, settings, namespace, key, fields):
    before = await store_revision(settings)
    assert_invalid(await rpc_error(kv.Get(kv_pb2.GetRequest(namespace=namespace, key=key))), *fields)
    assert_invalid(
        await rpc_error(kv.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=b"v"))), *fields
    )
    assert_invalid(await rpc_error(kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, key=key))), *fields)
    await assert_nothing_written(settings, before, (namespace, key))


async def test_value_over_the_limit_is_rejected_and_not_written(kv, settings, namespace):
    before = await store_revision(settings)
    assert_invalid(
        await rpc_error(
            kv.Put(kv_pb2.PutRequest(namespace=namespace, key="big", value=b"x" * (1024 * 1024 + 1)))
        ),
        "value",
    )
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_total_size=True))
    assert listed.total_size == 0
    await assert_nothing_written(settings, before, (namespace, "big"))


async def test_value_at_the_limit_is_accepted(kv, namespace):
    response = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="big", value=b"x" * (1024 * 1024)))
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="big"))
    assert len(got.kv.value) == 1024 * 1024 and got.kv.mod_revision == response.header.revision


async def test_negative_ttl_is_rejected(kv, settings, namespace):
    before = await store_revision(settings)
    request = kv_pb2.PutRequest(
        namespace=namespace, key="k", value=b"v", ttl=duration_pb2.Duration(seconds=-1)
    )
    assert_invalid(await rpc_error(kv.Put(request)), "ttl")
    await assert_nothing_written(settings, before, (namespace, "k"))


async def test_negative_if_revision_is_rejected(kv, settings, namespace):
    before = await store_revision(settings)
    assert_invalid(
        await rpc_error(kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", if_revision=-5))),
        "if_revision",
    )
    await assert_nothing_written(settings, before, (namespace, "k"))


async def test_content_type_with_control_characters_is_rejected(kv, settings, namespace):
    before = await store_revision(settings)
    request = kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v", content_type="text/plain\r\nX: y")
    assert_invalid(await rpc_error(kv.Put(request)), "content_type")
    await assert_nothing_written(settings, before, (namespace, "k"))


async def test_batch_put_reports_every_bad_item_by_index_and_writes_nothing(kv, settings, namespace):
    before = await store_revision(settings)
    items = [
        kv_pb2.BatchPutItem(key="good", value=b"v"),
        kv_pb2.BatchPutItem(key="", value=b"v"),
        kv_pb2.BatchPutItem(key="dup", value=b"v"),
        kv_pb2.BatchPutItem(key="dup", value=b"v"),
        kv_pb2.BatchPutItem(key="neg", value=b"v", ttl=duration_pb2.Duration(seconds=-3)),
    ]
    assert_invalid(
        await rpc_error(kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))),
        "items[1].key",
        "items[3].key",
        "items[4].ttl",
    )
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_total_size=True))
    assert listed.total_size == 0
    await assert_nothing_written(settings, before, *((namespace, item.key) for item in items))


async def test_empty_and_oversized_batches_are_rejected(kv, settings, namespace):
    before = await store_revision(settings)
    assert_invalid(await rpc_error(kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace))), "items")
    assert_invalid(await rpc_error(kv.BatchGet(kv_pb2.BatchGetRequest(namespace=namespace))), "keys")
    keys = [f"k{i}" for i in range(1001)]
    assert_invalid(
        await rpc_error(kv.BatchGet(kv_pb2.BatchGetRequest(namespace=namespace, keys=keys))), "keys"
    )
    items = [kv_pb2.BatchPutItem(key=key, value=b"v") for key in keys]
    assert_invalid(
        await rpc_error(kv.BatchPut(kv_pb2.BatchPutRequest(namespace=namespace, items=items))), "items"
    )
    await assert_nothing_written(settings, before, *((namespace, key) for key in keys))


async def test_delete_needs_a_target_and_prefix_cannot_compare(kv, settings, namespace):
    kept = await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="a1", value=b"v"))
    before = await store_revision(settings)
    assert_invalid(await rpc_error(kv.Delete(kv_pb2.DeleteRequest(namespace=namespace))), "key")
    assert_invalid(
        await rpc_error(kv.Delete(kv_pb2.DeleteRequest(namespace=namespace, prefix="a", if_revision=1))),
        "if_revision",
    )
    await assert_nothing_written(settings, before)
    got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="a1"))
    assert got.kv.mod_revision == kept.kv.mod_revision  # the key under the prefix is still there


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


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (every field here is shorter than 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


NAMESPACE = b"\x00namespace\x00"  # stands for the test's namespace in the bodies below


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"\xff\xff\xff\xff", "request"),  # not protobuf at all
        (_field(1, NAMESPACE) + b"\x12\x05ab", "request"),  # key's length says 5, only 2 bytes follow
        (_field(1, b"\xff\xfe") + _field(2, b"k"), "namespace"),
        (_field(2, b"\xc3\x28k") + _field(1, NAMESPACE), "key"),
        (
            _field(1, NAMESPACE) + _field(2, b"k") + _field(4, b"text/\xc0\xaf"),
            "content_type",
        ),  # overlong "/"
        (_field(1, NAMESPACE) + _field(2, b"\xed\xa0\x80"), "key"),  # a lone surrogate
        (_field(1, NAMESPACE) + _field(2, b"\xc3\x28") + b"\x3a", "request"),  # and a cut-off field
    ],
    ids=["garbage", "truncated", "namespace", "key", "content_type", "surrogate", "utf8-and-truncated"],
)
async def test_undecodable_request_bytes_are_invalid_argument_naming_the_field(
    kv_channel, settings, namespace, body, field
):
    raw_put = kv_channel.unary_unary(
        "/strata.kv.v1.KvService/Put", request_serializer=None, response_deserializer=None
    )
    body = body.replace(_field(1, NAMESPACE), _field(1, namespace.encode()))
    before = await store_revision(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_put(body)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    description = (
        "is not valid UTF-8" if field != "request" else "the message cannot be decoded (malformed bytes)"
    )
    assert field_violations(caught.value) == {field: description}
    # Nothing at all: the bodies name no other key a lenient decoder could have made of them.
    await assert_nothing_written(settings, before, (namespace, "k"))


async def test_invalid_utf8_in_a_batch_item_names_the_item_and_writes_nothing(
    kv_channel, settings, namespace
):
    raw_batch_put = kv_channel.unary_unary(
        "/strata.kv.v1.KvService/BatchPut", request_serializer=None, response_deserializer=None
    )
    items = [_field(1, b"good") + _field(2, b"v"), _field(1, b"bad\xff") + _field(2, b"v")]
    body = _field(1, namespace.encode()) + b"".join(_field(2, item) for item in items)
    before = await store_revision(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_batch_put(body)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == {"items[1].key": "is not valid UTF-8"}
    await assert_nothing_written(settings, before, (namespace, "good"))


async def test_message_over_the_server_limit_is_resource_exhausted(kv, settings, namespace):
    before = await store_revision(settings)
    request = kv_pb2.PutRequest(namespace=namespace, key="k", value=b"x" * (settings.max_message_bytes + 10))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Put(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_nothing_written(settings, before, (namespace, "k"))


async def test_expired_deadline_is_deadline_exceeded_and_writes_nothing(kv, settings, namespace):
    before = await store_revision(settings)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="late", value=b"v"), timeout=0.000001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    listed = await kv.List(kv_pb2.ListRequest(namespace=namespace, include_total_size=True))
    assert listed.total_size == 0
    await assert_nothing_written(settings, before, (namespace, "late"))


async def test_unknown_method_is_unimplemented(kv_channel):
    call = kv_channel.unary_unary(
        "/strata.kv.v1.KvService/Nope", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

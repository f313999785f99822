"""shared.rpc.wireformat: the string field that is not valid UTF-8, named as a BadRequest names it."""

from __future__ import annotations

import importlib
import pkgutil
import random

import pytest
import strata
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2

from shared.api.errors import FieldViolation
from shared.rpc.wireformat import MAX_DEPTH, MAX_FIELDS, invalid_utf8_field
from tests.support.protowire import length_delimited, parses, strings_as_bytes, varint

BAD = b"\xc3\x28"  # a lead byte followed by no continuation byte
FD = descriptor_pb2.FieldDescriptorProto


# -- a message with what Strata's protos lack: maps with number and bool keys -------


def _sample_type() -> type[Message]:
    file = descriptor_pb2.FileDescriptorProto(name="wiretest.proto", package="wiretest", syntax="proto3")
    item = file.message_type.add(name="Item")
    item.field.add(name="name", number=1, type=FD.TYPE_STRING, label=FD.LABEL_OPTIONAL)
    sample = file.message_type.add(name="Sample")
    sample.field.add(name="text", number=1, type=FD.TYPE_STRING, label=FD.LABEL_OPTIONAL)
    sample.field.add(name="numbers", number=2, type=FD.TYPE_INT32, label=FD.LABEL_REPEATED)
    sample.field.add(name="fixed", number=3, type=FD.TYPE_FIXED32, label=FD.LABEL_REPEATED)
    for number, (name, key_type, value_type) in enumerate(
        [
            ("by_number", FD.TYPE_INT32, FD.TYPE_STRING),
            ("by_signed", FD.TYPE_SINT64, FD.TYPE_STRING),
            ("by_flag", FD.TYPE_BOOL, FD.TYPE_STRING),
            ("by_name", FD.TYPE_STRING, FD.TYPE_MESSAGE),
        ],
        start=4,
    ):
        entry = sample.nested_type.add(name=f"Entry{number}")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=key_type, label=FD.LABEL_OPTIONAL)
        value = entry.field.add(name="value", number=2, type=value_type, label=FD.LABEL_OPTIONAL)
        if value_type == FD.TYPE_MESSAGE:
            value.type_name = ".wiretest.Item"
        sample.field.add(
            name=name,
            number=number,
            type=FD.TYPE_MESSAGE,
            label=FD.LABEL_REPEATED,
            type_name=f".wiretest.Sample.{entry.name}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("wiretest.Sample"))


Sample = _sample_type()


def named(message_type: type[Message], body: bytes) -> FieldViolation | None:
    """What the walker names, checked against the parser: it refuses the body, and only for UTF-8."""
    found = invalid_utf8_field(message_type, body)
    if found is not None:
        assert not parses(message_type, body) and parses(strings_as_bytes(message_type), body)
    return found


def bad(field: str) -> FieldViolation:
    return FieldViolation(field, "is not valid UTF-8")


# -- naming ----------------------------------------------------------------------


def test_a_valid_message_names_nothing():
    body = kv_pb2.PutRequest(namespace="ns", key="ключ", value=b"\xff").SerializeToString()
    assert invalid_utf8_field(kv_pb2.PutRequest, body) is None


@pytest.mark.parametrize("field", ["namespace", "key", "content_type"])
def test_a_top_level_string_is_named(field):
    body = strings_as_bytes(kv_pb2.PutRequest)(**{field: BAD}, value=b"\xff").SerializeToString()
    assert named(kv_pb2.PutRequest, body) == bad(field)


def test_a_string_in_a_nested_message_is_named_by_its_path():
    twin = strings_as_bytes(tenants_pb2.CreateRecordRequest)()
    twin.record.collection = b"c"
    twin.record.id = b"id-" + BAD
    assert named(tenants_pb2.CreateRecordRequest, twin.SerializeToString()) == bad("record.id")


def test_repeated_messages_are_named_by_their_index_as_sent():
    twin = strings_as_bytes(kv_pb2.BatchPutRequest)(namespace=b"ns")
    for key in (b"a", b"b", BAD, b"d"):
        twin.items.add(key=key, value=b"v")
    assert named(kv_pb2.BatchPutRequest, twin.SerializeToString()) == bad("items[2].key")


def test_repeated_strings_are_named_by_their_index():
    twin = strings_as_bytes(kv_pb2.BatchGetRequest)(namespace=b"ns", keys=[b"a", BAD, b"c"])
    assert named(kv_pb2.BatchGetRequest, twin.SerializeToString()) == bad("keys[1]")


def test_the_first_bad_string_as_sent_is_named():
    namespace, key = length_delimited(1, b"n" + BAD), length_delimited(2, BAD)
    assert named(kv_pb2.PutRequest, namespace + key) == bad("namespace")
    assert named(kv_pb2.PutRequest, key + namespace) == bad("key")


def test_a_map_value_is_named_by_its_key():
    record = strings_as_bytes(tenants_pb2.CreateRecordRequest)()
    record.record.collection = b"c"
    entry = record.record.data.fields.add(key='a "quoted" ключ'.encode())
    entry.value.string_value = BAD
    assert named(tenants_pb2.CreateRecordRequest, record.SerializeToString()) == bad(
        'record.data.fields["a \\"quoted\\" ключ"].string_value'
    )


def test_a_string_deep_in_json_is_named_through_maps_and_lists():
    twin = strings_as_bytes(struct_pb2.Struct)()
    values = twin.fields.add(key=b"list").value.list_value.values
    values.add(string_value=b"fine")
    values.add(struct_value={}).struct_value.fields.add(key=b"inner").value.string_value = BAD
    assert named(struct_pb2.Struct, twin.SerializeToString()) == bad(
        'fields["list"].list_value.values[1].struct_value.fields["inner"].string_value'
    )


def test_a_map_key_that_is_not_utf8_names_the_map():
    twin = strings_as_bytes(struct_pb2.Struct)()
    twin.fields.add(key=b"fine").value.string_value = b"x"
    twin.fields.add(key=BAD).value.string_value = b"x"
    assert named(struct_pb2.Struct, twin.SerializeToString()) == FieldViolation(
        "fields", "has a key that is not valid UTF-8"
    )


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ({"by_number": [(-3, BAD)]}, "by_number[-3]"),
        ({"by_number": [(7, BAD)]}, "by_number[7]"),
        ({"by_signed": [(-5, BAD)]}, "by_signed[-5]"),
        ({"by_flag": [(True, BAD)]}, "by_flag[true]"),
        ({"by_flag": [(False, BAD)]}, "by_flag[false]"),
        ({"by_name": [(b"x", BAD)]}, 'by_name["x"].name'),
    ],
)
def test_map_keys_of_other_types_are_written_as_a_path_writes_them(entry, path):
    twin = strings_as_bytes(Sample)()
    for field, pairs in entry.items():
        for key, value in pairs:
            item = getattr(twin, field).add(key=key)
            if field == "by_name":
                item.value.name = value
            else:
                item.value = value
    assert named(Sample, twin.SerializeToString()) == bad(path)


def test_packed_fields_are_walked_past():
    twin = strings_as_bytes(Sample)(numbers=[1, -1, 300], fixed=[7, 8])
    body = twin.SerializeToString() + length_delimited(1, BAD)
    assert twin.SerializeToString()[0] == 2 << 3 | 2  # numbers went packed
    assert named(Sample, body) == bad("text")


@pytest.mark.parametrize(
    "packed",
    [
        length_delimited(2, b"\x01\x81"),  # a varint cut off inside the packed field
        length_delimited(2, b"\xff" * 10 + b"\x01"),  # a varint of eleven bytes
        length_delimited(3, b"\x01\x00\x00"),  # three bytes of a fixed32
    ],
)
def test_a_malformed_packed_field_names_nothing(packed):
    body = packed + length_delimited(1, BAD)
    assert not parses(strings_as_bytes(Sample), body)
    assert invalid_utf8_field(Sample, body) is None


def test_a_string_field_sent_with_another_wire_type_is_an_unknown_field():
    key_as_varint = varint(2 << 3 | 0) + varint(5)
    assert named(kv_pb2.PutRequest, key_as_varint + length_delimited(1, BAD)) == bad("namespace")
    assert parses(kv_pb2.PutRequest, key_as_varint + length_delimited(1, b"ns"))


def test_unknown_fields_and_groups_are_walked_past():
    group = varint(99 << 3 | 3) + length_delimited(1, BAD) + varint(99 << 3 | 4)
    unknown = (
        length_delimited(50, BAD) + varint(51 << 3 | 5) + b"\x00" * 4 + varint(52 << 3 | 1) + b"\x00" * 8
    )
    assert named(kv_pb2.PutRequest, group + unknown + length_delimited(2, BAD)) == bad("key")


# -- bytes that are malformed otherwise: nothing named ------------------------------


def test_every_cut_off_body_names_nothing():
    twin = strings_as_bytes(kv_pb2.BatchPutRequest)(namespace=b"ns")
    twin.items.add(key=BAD, value=b"value")
    twin.items.add(key=b"k", value=b"v", content_type=b"a/b")
    whole = twin.SerializeToString()
    cuts = [whole[:end] for end in range(1, len(whole)) if not parses(type(twin), whole[:end])]
    assert len(cuts) > 10
    assert [cut for cut in cuts if invalid_utf8_field(kv_pb2.BatchPutRequest, cut) is not None] == []


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff\xff",  # a tag that never ends
        b"\x0a\x05ab",  # a length past the end
        b"\x00\x01",  # field number 0
        b"\x0f",  # wire type 7
        b"\x0c",  # an end-group tag outside a group
        varint(9 << 3 | 3) + length_delimited(1, b"x"),  # a group that never ends
        varint(9 << 3 | 3) + varint(8 << 3 | 4),  # a group ended by another number
        b"\x88\x80\x80\x80\x80\x00\x01",  # a tag of six bytes
        b"\x12\x81\x80\x80\x80\x80\x00x",  # a length of six bytes
    ],
)
def test_malformed_bytes_around_a_bad_string_name_nothing(body):
    for whole in (body + length_delimited(2, BAD), length_delimited(2, BAD) + body):
        assert not parses(strings_as_bytes(kv_pb2.PutRequest), whole)
        assert invalid_utf8_field(kv_pb2.PutRequest, whole) is None


def _nested_json(levels: int) -> tuple[type[Message], bytes]:
    """A JSON Value or ListValue with ``levels`` messages nested in it, the innermost a bad string."""
    inner = length_delimited(3, BAD)  # Value.string_value
    for level in range(levels):
        # From the inside out: ListValue.values (1) holds a Value, Value.list_value (6) a ListValue.
        inner = length_delimited(1 if level % 2 == 0 else 6, inner)
    return (struct_pb2.Value if levels % 2 == 0 else struct_pb2.ListValue), inner


@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH])
def test_nesting_as_deep_as_protobuf_allows_is_walked(levels):
    message_type, body = _nested_json(levels)
    assert parses(strings_as_bytes(message_type), body)
    assert named(message_type, body) is not None


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, MAX_DEPTH + 2, 10_000])
def test_nesting_deeper_than_protobuf_allows_names_nothing(levels):
    message_type, body = _nested_json(levels)
    assert not parses(strings_as_bytes(message_type), body)
    assert invalid_utf8_field(message_type, body) is None


def test_more_fields_than_the_budget_name_nothing():
    filler = varint(7 << 3 | 0) + b"\x01"  # return_previous = true
    within = filler * (MAX_FIELDS - 1) + length_delimited(2, BAD)
    assert named(kv_pb2.PutRequest, within) == bad("key")
    assert invalid_utf8_field(kv_pb2.PutRequest, filler * MAX_FIELDS + length_delimited(2, BAD)) is None


# -- against the parser itself ---------------------------------------------------------


def _request_types() -> list[type[Message]]:
    found: list[type[Message]] = [Sample, struct_pb2.Struct]
    for module in pkgutil.walk_packages(strata.__path__, "strata."):
        if module.name.endswith("_pb2"):
            descriptors = importlib.import_module(module.name).DESCRIPTOR.message_types_by_name.values()
            found.extend(message_factory.GetMessageClass(d) for d in descriptors)
    return found


def _piece(rng: random.Random, descriptor: Descriptor, depth: int = 0) -> bytes:
    """One field of ``descriptor`` (or an unknown one) with a random, often broken, payload."""
    if not descriptor.fields or rng.random() < 0.1:
        return rng.randbytes(rng.randint(1, 6))
    field: FieldDescriptor = rng.choice(descriptor.fields)
    payload = rng.choice([BAD, b"ok", b"\xff", b"", rng.randbytes(rng.randint(1, 8))])
    if field.message_type is not None and depth < 4 and rng.random() < 0.7:
        payload = b"".join(_piece(rng, field.message_type, depth + 1) for _ in range(rng.randint(1, 3)))
    return length_delimited(field.number, payload)


@pytest.mark.parametrize("message_type", _request_types(), ids=lambda t: t.DESCRIPTOR.full_name)
def test_a_field_is_named_exactly_when_the_parser_refuses_only_for_utf8(message_type):
    rng = random.Random(message_type.DESCRIPTOR.full_name)  # the same bodies every run
    twin = strings_as_bytes(message_type)
    for _ in range(200):
        body = b"".join(_piece(rng, message_type.DESCRIPTOR) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            body = body[: rng.randrange(len(body) + 1)]
        utf8_alone = not parses(message_type, body) and parses(twin, body)
        assert (invalid_utf8_field(message_type, body) is not None) == utf8_alone, body

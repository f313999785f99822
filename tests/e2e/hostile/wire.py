"""Hand-encoded protobuf, for what the library refuses to build: filters and JSON nested
thousands deep, and a request with one message field replaced by such bytes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from google.protobuf import descriptor, message, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from strata.common.v1 import filter_pb2

from tests.e2e.hostile.rpcs import MAX_DEPTH, is_map
from tests.support.protowire import length_delimited, varint


def _nested(innermost: bytes, wrappers: Sequence[int], depth: int) -> bytes:
    """``innermost`` wrapped ``depth`` times in the chain of length-delimited fields ``wrappers``.

    Built from the inside out as a list of prefixes: 10,000 levels by
    concatenation would copy the growing message at every level.
    """
    prefixes: list[bytes] = []
    size = len(innermost)
    for _ in range(depth):
        for number in wrappers:
            prefix = varint(number << 3 | 2) + varint(size)
            prefixes.append(prefix)
            size += len(prefix)
    return b"".join(reversed(prefixes)) + innermost


def deep_filter(depth: int) -> bytes:
    """A Filter of ``depth`` all_of levels around one condition."""
    leaf = filter_pb2.Filter(
        condition=filter_pb2.Condition(
            path="p", op=filter_pb2.OPERATOR_EQ, value=struct_pb2.Value(string_value="x")
        )
    ).SerializeToString()
    filters = filter_pb2.FilterList.DESCRIPTOR.fields_by_name["filters"].number
    all_of = filter_pb2.Filter.DESCRIPTOR.fields_by_name["all_of"].number
    return _nested(leaf, (filters, all_of), depth)


def deep_struct(depth: int) -> bytes:
    """A Struct ``{"p": {"p": ... "x"}}`` ``depth`` objects deep."""
    value = struct_pb2.Value(string_value="x").SerializeToString()
    fields = struct_pb2.Struct.DESCRIPTOR.fields_by_name["fields"].number
    entry_value = struct_pb2.Struct.DESCRIPTOR.fields_by_name["fields"].message_type.fields_by_name["value"]
    key = length_delimited(1, b"p")  # the map entry's key
    struct_value = struct_pb2.Value.DESCRIPTOR.fields_by_name["struct_value"].number
    # Each level: Value{struct_value: Struct{fields: {key: "p", value: <inner Value>}}}.
    inner = value
    for _ in range(depth):
        entry = key + length_delimited(entry_value.number, inner)
        inner = length_delimited(struct_value, length_delimited(fields, entry))
    return length_delimited(fields, key + length_delimited(entry_value.number, inner))


def embed(msg: message.Message, path: Sequence[str], raw: bytes) -> bytes:
    """``msg`` encoded with the message field at ``path`` replaced by the encoded message ``raw``."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    name = path[0]
    f = copy.DESCRIPTOR.fields_by_name[name]
    inner = raw
    if len(path) > 1:
        current = getattr(copy, name)
        sub = current[0] if f.is_repeated else current
        inner = embed(sub, path[1:], raw)
    copy.ClearField(name)
    return copy.SerializeToString() + length_delimited(f.number, inner)


def message_paths(
    desc: descriptor.Descriptor, kind: str, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Paths to the fields of message type ``kind`` in ``desc`` (not inside such a field)."""
    for f in desc.fields:
        if f.type != FieldDescriptor.TYPE_MESSAGE or is_map(f):
            continue
        path = (*prefix, f.name)
        if f.message_type.full_name == kind:
            yield path
        elif not f.message_type.full_name.startswith("google.protobuf.") and len(path) < MAX_DEPTH:
            yield from message_paths(f.message_type, kind, path)

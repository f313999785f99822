"""Hand-made protobuf for tests: fields the library refuses to build, and string-free twins of messages."""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError, Message

FD = descriptor_pb2.FieldDescriptorProto


def varint(value: int) -> bytes:
    """``value`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field ``number`` holding ``payload`` (wire type 2): what the library refuses to build for bad bytes."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# -- twins: the same messages with every string field turned into bytes --------------


def _files(file: FileDescriptor) -> list[FileDescriptor]:
    """``file`` and everything it imports, each after its own imports."""
    order: list[FileDescriptor] = []

    def visit(current: FileDescriptor) -> None:
        if current not in order:
            for dependency in current.dependencies:
                visit(dependency)
            order.append(current)

    visit(file)
    return order


def _strings_to_bytes(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type == FD.TYPE_STRING:
            field.type = FD.TYPE_BYTES
    for nested in message.nested_type:
        # A bytes map key is not allowed; on the wire a map is a repeated entry message.
        nested.options.ClearField("map_entry")
        _strings_to_bytes(nested)


@cache
def strings_as_bytes(message_type: type[Message]) -> type[Message]:
    """``message_type`` with every string field (its imports' too) turned into bytes.

    The twin encodes any bytes where the original has a string, and parses
    what the original parses except for the UTF-8 check: a body the original
    refuses but its twin accepts is refused for invalid UTF-8 alone.
    """
    pool = descriptor_pool.DescriptorPool()
    for file in _files(message_type.DESCRIPTOR.file):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        for message in proto.message_type:
            _strings_to_bytes(message)
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(message_type.DESCRIPTOR.full_name))


def parses(message_type: type[Message], body: bytes) -> bool:
    """Whether ``message_type`` parses ``body``."""
    try:
        message_type.FromString(body)
    except DecodeError:
        return False
    return True

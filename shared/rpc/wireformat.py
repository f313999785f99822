"""Which string field of an encoded protobuf message is not valid UTF-8.

Protobuf's parser refuses a string field holding invalid UTF-8 with the same
``DecodeError`` as any other malformed bytes. :func:`invalid_utf8_field`
walks the wire format against the message's descriptor to tell the two
apart, so that a BadRequest can name the field (``key``, ``items[2].key``)
rather than the whole ``request``. It runs only after the parser has refused
a message, so it favours plainness over speed, within a budget of fields.
"""

from __future__ import annotations

import json
from typing import cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from shared.api.errors import FieldViolation

__all__ = ["MAX_DEPTH", "MAX_FIELDS", "invalid_utf8_field"]

# Protobuf's own limit: a message nested deeper than this is refused whatever it holds.
MAX_DEPTH = 100
# Fields walked before giving up (the whole request is then named): bounds the
# time a hostile body holds the event loop here to some tens of milliseconds,
# and is more than any request Strata accepts has (a full BatchPut: a few thousand).
MAX_FIELDS = 10_000

_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = range(6)
_ZIGZAG = {FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}
_SIGNED = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}


class _Malformed(Exception):
    """The bytes are not a well-formed message, whatever their strings hold."""


def invalid_utf8_field(message_type: type[Message], data: bytes) -> FieldViolation | None:
    """The violation naming the first string field of ``data``, a ``message_type``, that is not valid UTF-8.

    Fields are named as in every Strata BadRequest: ``key``,
    ``items[2].key`` (the index counts the repeated field's elements as
    sent), ``data.fields["a"].string_value`` (a map value, by its key); a map
    key that is not valid UTF-8 names the map. None when every string is
    valid UTF-8, or when the bytes are malformed in any other way (cut off,
    a bad tag or length, nested deeper than protobuf allows, more fields than
    :data:`MAX_FIELDS`): the message as a whole is then at fault.
    """
    # The stubs also allow upb's own Descriptor class: at run time they are one class.
    descriptor = cast(Descriptor, message_type.DESCRIPTOR)
    try:
        return _Walker(data).message(descriptor, 0, len(data), "", 0)
    except _Malformed:
        return None


class _Walker:
    """One pass over one buffer; positions are offsets into it, so nothing is copied."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fields = 0

    def message(
        self, descriptor: Descriptor, pos: int, end: int, path: str, depth: int
    ) -> FieldViolation | None:
        """Walk the message in ``data[pos:end]`` whole; the first bad string below ``path``."""
        if depth > MAX_DEPTH:
            raise _Malformed
        found: FieldViolation | None = None
        counts: dict[int, int] = {}  # elements of each repeated field seen so far
        while pos < end:
            number, wire, start = self.tag(pos, end)
            pos = self.skip(number, wire, start, end, depth)
            field = descriptor.fields_by_number.get(number)
            # Unknown fields, and wire types other than the field's (protobuf keeps
            # those as unknown fields), hold no string to check.
            if field is not None and wire == _LENGTH:
                bad = self.value(field, self.length_start(start), pos, _name(path, field, counts), depth)
                found = found or bad  # walked on regardless: malformed bytes later still count
        return found

    def value(
        self, field: FieldDescriptor, start: int, end: int, path: str, depth: int
    ) -> FieldViolation | None:
        """Check one length-delimited value of ``field`` in ``data[start:end]``, named ``path``."""
        if field.type == _STRING:
            return None if _is_utf8(self.data[start:end]) else FieldViolation(path, "is not valid UTF-8")
        if field.message_type is not None and _is_map(field):
            return self.map_entry(field.message_type, start, end, path, depth + 1)
        if field.message_type is not None:
            return self.message(field.message_type, start, end, path, depth + 1)
        if field.is_repeated and field.type != FieldDescriptor.TYPE_BYTES:
            self.packed(field, start, end)
        return None

    def map_entry(
        self, entry: Descriptor, pos: int, end: int, path: str, depth: int
    ) -> FieldViolation | None:
        """Walk one map entry, naming a bad value by its key: ``path["k"]``; a bad key names the map."""
        inner = self.message(entry, pos, end, "", depth)
        if inner is None:
            return None
        key = self.map_key(entry.fields_by_number[1], pos, end)
        if key is None:
            return FieldViolation(path, "has a key that is not valid UTF-8")
        return FieldViolation(f"{path}[{key}]{inner.field.removeprefix('value')}", inner.description)

    def map_key(self, field: FieldDescriptor, pos: int, end: int) -> str | None:
        """The entry's key as a path writes it: JSON for a string, else the number (the last one sent).

        None when a key sent is not valid UTF-8.
        """
        key: str | int = "" if field.type == _STRING else 0
        while pos < end:
            number, wire, start = self.tag(pos, end)
            pos = self.skip(number, wire, start, end, 0)
            if number == 1 and wire == _wire_type(field):
                content = self.length_start(start) if wire == _LENGTH else start
                value = self.scalar(field, content, pos)
                if value is None:
                    return None
                key = value
        if field.type == FieldDescriptor.TYPE_BOOL:
            return "true" if key else "false"
        return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else str(key)

    def scalar(self, field: FieldDescriptor, start: int, end: int) -> str | int | None:
        """The value of a map key type (string, integer, bool) in ``data[start:end]``; None: bad UTF-8."""
        raw = self.data[start:end]
        if field.type == _STRING:
            return raw.decode() if _is_utf8(raw) else None
        if _wire_type(field) != _VARINT:
            return int.from_bytes(raw, "little", signed=field.type in _SIGNED)
        value = self.varint(start, end)[0]
        if field.type in _ZIGZAG:
            return (value >> 1) ^ -(value & 1)
        bits = 32 if field.type == FieldDescriptor.TYPE_INT32 else 64
        if field.type in _SIGNED and value & (1 << (bits - 1)):
            return (value & ((1 << bits) - 1)) - (1 << bits)
        return value

    def packed(self, field: FieldDescriptor, pos: int, end: int) -> None:
        """Check a packed repeated scalar: whole values only, as protobuf does."""
        wire = _wire_type(field)
        if wire != _VARINT:
            if (end - pos) % (8 if wire == _FIXED64 else 4):
                raise _Malformed
            return
        while pos < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _Malformed
            pos = self.varint(pos, end)[1]

    def tag(self, pos: int, end: int) -> tuple[int, int, int]:
        """(field number, wire type, position after the tag)."""
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise _Malformed
        key, pos = self.varint(pos, end, 5)  # a tag is a 32-bit varint
        number, wire = key >> 3, key & 7
        if number == 0 or key > 0xFFFFFFFF or wire > _FIXED32:
            raise _Malformed
        return number, wire, pos

    def skip(self, number: int, wire: int, pos: int, end: int, depth: int) -> int:
        """The position after the value of one field whose tag ended at ``pos``."""
        if wire == _VARINT:
            return self.varint(pos, end)[1]
        if wire == _GROUP_START:
            return self.group(number, pos, end, depth + 1)
        if wire == _GROUP_END:
            raise _Malformed  # outside a group
        if wire == _LENGTH:
            size, pos = self.varint(pos, end, 5)  # a length is a 32-bit varint too
            pos += size
        else:
            pos += 8 if wire == _FIXED64 else 4
        if pos > end:
            raise _Malformed
        return pos

    def group(self, number: int, pos: int, end: int, depth: int) -> int:
        """The position after the group ``number`` (walked as unknown fields) that starts at ``pos``."""
        if depth > MAX_DEPTH:
            raise _Malformed
        while pos < end:
            inner, wire, pos = self.tag(pos, end)
            if wire == _GROUP_END:
                if inner != number:
                    raise _Malformed
                return pos
            pos = self.skip(inner, wire, pos, end, depth)
        raise _Malformed

    def length_start(self, pos: int) -> int:
        """Where the content of a length-delimited value begins, its length starting at ``pos``."""
        return self.varint(pos, len(self.data), 5)[1]

    def varint(self, pos: int, end: int, most: int = 10) -> tuple[int, int]:
        """(value, position after it); at most ``most`` bytes, as protobuf reads them."""
        value = 0
        for shift in range(0, 7 * most, 7):
            if pos >= end:
                raise _Malformed
            byte = self.data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value & (2**64 - 1), pos
        raise _Malformed


_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_FIXED_WIRE = {
    FieldDescriptor.TYPE_FIXED32: _FIXED32,
    FieldDescriptor.TYPE_SFIXED32: _FIXED32,
    FieldDescriptor.TYPE_FLOAT: _FIXED32,
    FieldDescriptor.TYPE_FIXED64: _FIXED64,
    FieldDescriptor.TYPE_SFIXED64: _FIXED64,
    FieldDescriptor.TYPE_DOUBLE: _FIXED64,
}


def _name(path: str, field: FieldDescriptor, counts: dict[int, int]) -> str:
    """``path.field``, with the element's index for a repeated field (``counts`` keeps them)."""
    name = f"{path}.{field.name}" if path else field.name
    if not field.is_repeated or _is_map(field):
        return name
    index = counts.get(field.number, 0)
    counts[field.number] = index + 1
    return f"{name}[{index}]"


def _wire_type(field: FieldDescriptor) -> int:
    """The wire type one unpacked value of ``field`` is sent with."""
    if field.type in (_STRING, _MESSAGE, FieldDescriptor.TYPE_BYTES):
        return _LENGTH
    return _FIXED_WIRE.get(field.type, _VARINT)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True

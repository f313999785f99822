"""Validation of KV requests and the key ranges they select.

Every limit is checked before anything touches the database; a rejected call
lists every violated field in one INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.protobuf import duration_pb2
from strata.kv.v1 import kv_pb2

from shared.api.errors import FieldViolation, StrataError, aborted, raise_invalid
from shared.api.pagetoken import page_size
from shared.config.settings import Settings

__all__ = ["KeyRange", "Limits", "cache_key", "prefix_end", "raise_if", "revision_mismatch"]

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_CONTENT_TYPE_RE = re.compile(r"[\x20-\x7e]{0,255}")
_MAX_CODE_POINT = 0x10FFFF


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys ``k`` with ``start <= k`` and, when ``end`` is set, ``k < end`` (code point order)."""

    start: str
    end: str | None

    @classmethod
    def single(cls, key: str) -> KeyRange:
        # Keys never contain NUL, so key + "\x01" is the next possible key.
        return cls(key, key + "\x01")

    @classmethod
    def prefix(cls, prefix: str) -> KeyRange:
        return cls(prefix, prefix_end(prefix))

    def intersect(self, start: str, end: str) -> KeyRange:
        """This range narrowed to [start, end) ("" end: unbounded)."""
        lo = max(self.start, start)
        hi = self.end
        if end and (hi is None or end < hi):
            hi = end
        return KeyRange(lo, hi)

    def contains(self, key: str) -> bool:
        return key >= self.start and (self.end is None or key < self.end)


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    None when there is none (empty prefix, or only U+10FFFF characters).
    """
    chars = list(prefix)
    while chars and ord(chars[-1]) == _MAX_CODE_POINT:
        chars.pop()
    if not chars:
        return None
    nxt = ord(chars[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot appear in UTF-8 text
        nxt = 0xE000
    chars[-1] = chr(nxt)
    return "".join(chars)


def cache_key(tenant: str, namespace: str, key: str) -> bytes:
    """The cache key of one entry (NUL cannot occur in any part)."""
    return f"{tenant}\x00{namespace}\x00{key}".encode()


class Limits:
    """The request limits of one server, from settings."""

    def __init__(self, settings: Settings) -> None:
        self.max_key_bytes = settings.kv_max_key_bytes
        self.max_value_bytes = settings.kv_max_value_bytes
        self.max_batch = settings.kv_max_batch
        self.stream_max_age_s = settings.stream_max_age_s
        self.max_message_bytes = settings.max_message_bytes

    def namespace(self, value: str, errors: list[FieldViolation], field: str = "namespace") -> None:
        if not value:
            errors.append(FieldViolation(field, "required"))
        elif not _NAMESPACE_RE.fullmatch(value):
            errors.append(
                FieldViolation(
                    field, "must be 1-128 characters of [A-Za-z0-9._:/-], starting with a letter or digit"
                )
            )

    def key(
        self, value: str, errors: list[FieldViolation], field: str = "key", *, allow_empty: bool = False
    ) -> None:
        if not value:
            if not allow_empty:
                errors.append(FieldViolation(field, "required"))
            return
        size = len(value.encode())
        if size > self.max_key_bytes:
            errors.append(FieldViolation(field, f"is {size} bytes; the limit is {self.max_key_bytes}"))
        if "\x00" in value:
            errors.append(FieldViolation(field, "must not contain NUL"))

    def value(self, value: bytes, errors: list[FieldViolation], field: str = "value") -> None:
        if len(value) > self.max_value_bytes:
            errors.append(
                FieldViolation(field, f"is {len(value)} bytes; the limit is {self.max_value_bytes}")
            )

    def content_type(self, value: str, errors: list[FieldViolation], field: str = "content_type") -> None:
        if not _CONTENT_TYPE_RE.fullmatch(value):
            errors.append(FieldViolation(field, "must be at most 255 printable ASCII characters"))

    def ttl_ms(
        self, ttl: duration_pb2.Duration, present: bool, errors: list[FieldViolation], field: str = "ttl"
    ) -> int:
        """The TTL in whole milliseconds (0: none), rounding sub-millisecond TTLs up."""
        if not present:
            return 0
        if ttl.seconds < 0 or ttl.nanos < 0:
            errors.append(FieldViolation(field, "must not be negative"))
            return 0
        if ttl.seconds > 10 * 365 * 86400:
            errors.append(FieldViolation(field, "must be at most ten years"))
            return 0
        return ttl.seconds * 1000 + (ttl.nanos + 999_999) // 1_000_000

    def if_revision(self, value: int, errors: list[FieldViolation], field: str = "if_revision") -> None:
        if value < 0:
            errors.append(FieldViolation(field, "must be >= 0 (0: the key must not exist)"))

    def batch_size(self, count: int, errors: list[FieldViolation], field: str) -> None:
        if count == 0:
            errors.append(FieldViolation(field, "at least one is required"))
        elif count > self.max_batch:
            errors.append(FieldViolation(field, f"has {count} entries; the limit is {self.max_batch}"))

    def target(
        self, request: kv_pb2.DeleteRequest | kv_pb2.WatchRequest, errors: list[FieldViolation]
    ) -> KeyRange:
        """The keys a request's ``target`` oneof (one key, or a prefix) selects."""
        target = request.WhichOneof("target")
        if target == "key":
            self.key(request.key, errors)
            return KeyRange.single(request.key)
        if target == "prefix":
            self.key(request.prefix, errors, "prefix", allow_empty=True)
            return KeyRange.prefix(request.prefix)
        errors.append(FieldViolation("key", "set key (one key) or prefix (every key under it)"))
        return KeyRange("", None)

    def page_size(self, value: int, errors: list[FieldViolation]) -> int:
        return page_size(value, errors)


def raise_if(errors: list[FieldViolation]) -> None:
    """Raise INVALID_ARGUMENT listing ``errors``, if any."""
    raise_invalid(errors)


def revision_mismatch(key: str, expected: int, current: int, revision: int) -> StrataError:
    """ABORTED for a failed compare-and-set on ``key``."""
    return aborted(
        "REVISION_MISMATCH",
        f"key {key!r} is at revision {current}, not {expected}",
        key=key,
        expected_revision=str(expected),
        current_revision=str(current),
        store_revision=str(revision),
    )

"""Conversions between database timestamps and protobuf Timestamps."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

__all__ = ["to_timestamp"]


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for ``value`` (None stays None, leaving the field unset)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp

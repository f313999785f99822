"""JSON documents stored in jsonb columns: one serialisation, one set of limits."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format, struct_pb2

from shared.api.errors import FieldViolation

__all__ = ["document_json", "holds_nul"]


def document_json(
    document: struct_pb2.Struct | dict[str, Any], field: str, errors: list[FieldViolation], *, max_bytes: int
) -> str:
    """``document`` as compact JSON text for a jsonb parameter, noting violations in ``errors``.

    Too large (UTF-8 bytes of the JSON) or holding a NUL character anywhere
    (Postgres jsonb cannot store U+0000) is a violation of ``field``.
    """
    data = json_format.MessageToDict(document) if isinstance(document, struct_pb2.Struct) else document
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > max_bytes:
        errors.append(FieldViolation(field, f"must be at most {max_bytes} bytes as JSON"))
    if holds_nul(data):
        errors.append(FieldViolation(field, "must not contain NUL characters (jsonb cannot store them)"))
    return text


def holds_nul(value: Any) -> bool:
    """Whether a JSON value (from json.loads or MessageToDict) holds U+0000 in any string or key."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_nul(v) for v in value)
    return False

"""Opaque page tokens (AIP-158) bound to the query that produced them.

A token carries a cursor and a fingerprint of the query's identifying fields.
Decoding checks both: a token that is not ours, was cut or edited, or comes
from another query (another namespace, filter or bound) answers
INVALID_ARGUMENT on ``page_token`` instead of returning a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from shared.errors import FieldViolation, invalid_argument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "decode_page_token",
    "encode_page_token",
    "page_cursor",
    "page_size",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_VERSION = 1
_SIGNATURE_BYTES = 12
# Binds tokens to Strata rather than protecting a secret: anyone may read a
# cursor, but an edited one fails the check instead of moving the cursor.
_KEY = b"strata-page-token-v1"


def _fingerprint(query: Sequence[Any]) -> str:
    raw = json.dumps(list(query), separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def encode_page_token(query: Sequence[Any], cursor: Any) -> str:
    """A token for the page after ``cursor`` of ``query`` (JSON-serialisable values)."""
    body = json.dumps(
        {"v": _VERSION, "q": _fingerprint(query), "c": cursor}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    signature = hmac.new(_KEY, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(signature + body).decode().rstrip("=")


def decode_page_token(token: str, query: Sequence[Any], *, domain: str = "strata") -> Any:
    """The cursor inside ``token``; INVALID_ARGUMENT unless it was made for ``query``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        signature, body = raw[:_SIGNATURE_BYTES], raw[_SIGNATURE_BYTES:]
        if not hmac.compare_digest(
            signature, hmac.new(_KEY, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
        ):
            raise ValueError("signature")
        decoded = json.loads(body)
        if not isinstance(decoded, dict) or decoded.get("v") != _VERSION:
            raise ValueError("version")
    except (ValueError, UnicodeDecodeError):
        raise invalid_argument(
            [FieldViolation("page_token", "is not a page token of this API (malformed or edited)")],
            domain=domain,
        ) from None
    if decoded.get("q") != _fingerprint(query):
        raise invalid_argument(
            [FieldViolation("page_token", "belongs to a different query; keep every other field the same")],
            domain=domain,
        )
    return decoded.get("c")


def page_size(value: int, errors: list[FieldViolation]) -> int:
    """The page size for a request's ``page_size``: 0 means the default; out of range is a violation."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        errors.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    return value or DEFAULT_PAGE_SIZE


def page_cursor(token: str, query: Sequence[Any], first: Any, *, domain: str = "strata") -> Any:
    """The cursor in ``token`` (see :func:`decode_page_token`), or ``first`` when there is no token."""
    return decode_page_token(token, query, domain=domain) if token else first

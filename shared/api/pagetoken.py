"""Opaque page tokens (AIP-158) bound to the query that produced them.

A token carries a cursor and a fingerprint of the query's identifying fields.
Decoding checks both: a token that is not ours, was cut or edited, or comes
from another query (another namespace, filter or bound) answers
INVALID_ARGUMENT on ``page_token`` instead of returning a wrong page.

Tokens are signed with a key derived from the deployment's
``STRATA_INTERNAL_SECRET`` (:class:`PageTokens`, which each service's ``app.py``
builds from its settings and hands to the servicers that page), so only
Strata can mint one: a cursor a caller chose never reaches a query. Cursors
are still checked for type (:meth:`PageTokens.cursor`,
:func:`invalid_page_token`), so that even a forged but correctly signed
token answers INVALID_ARGUMENT, never INTERNAL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from shared.api.errors import FieldViolation, StrataError, invalid_argument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "PageTokens",
    "invalid_page_token",
    "page_size",
    "page_token_key",
]

_T = TypeVar("_T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_VERSION = 1
_SIGNATURE_BYTES = 12
# Domain separation: the internal secret also signs caller identities.
_KEY_LABEL = b"strata-page-token-v1"
_INT64 = range(-(2**63), 2**63)


def page_token_key(secret: bytes) -> bytes:
    """The page-token signing key of the deployment whose internal secret is ``secret``."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def invalid_page_token() -> StrataError:
    """INVALID_ARGUMENT on ``page_token``: a token (or its cursor) that this API did not issue."""
    return invalid_argument(
        [FieldViolation("page_token", "is not a page token of this API (malformed or edited)")],
    )


def _fingerprint(query: Sequence[Any]) -> str:
    raw = json.dumps(list(query), separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def page_size(value: int, errors: list[FieldViolation]) -> int:
    """The page size for a request's ``page_size``: 0 means the default; out of range is a violation."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        errors.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    return value or DEFAULT_PAGE_SIZE


class PageTokens:
    """Mints and reads the page tokens of one deployment (every process of it shares the secret,
    so any replica reads any replica's tokens)."""

    def __init__(self, secret: bytes) -> None:
        """``secret``: the deployment's ``STRATA_INTERNAL_SECRET``."""
        self._key = page_token_key(secret)

    def encode(self, query: Sequence[Any], cursor: Any) -> str:
        """A token for the page after ``cursor`` of ``query`` (JSON-serialisable values)."""
        body = json.dumps(
            {"v": _VERSION, "q": _fingerprint(query), "c": cursor}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        signature = hmac.new(self._key, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
        return base64.urlsafe_b64encode(signature + body).decode().rstrip("=")

    def decode(self, token: str, query: Sequence[Any]) -> Any:
        """The cursor inside ``token``; INVALID_ARGUMENT unless it was made for ``query``."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            signature, body = raw[:_SIGNATURE_BYTES], raw[_SIGNATURE_BYTES:]
            if not hmac.compare_digest(
                signature, hmac.new(self._key, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
            ):
                raise ValueError("signature")
            decoded = json.loads(body)
            if not isinstance(decoded, dict) or decoded.get("v") != _VERSION:
                raise ValueError("version")
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested too deep
            raise invalid_page_token() from None
        if decoded.get("q") != _fingerprint(query):
            raise invalid_argument(
                [
                    FieldViolation(
                        "page_token", "belongs to a different query; keep every other field the same"
                    )
                ],
            )
        return decoded.get("c")

    def cursor(self, token: str, query: Sequence[Any], first: _T) -> _T:
        """The cursor in ``token`` (see :meth:`decode`), or ``first`` when there is no token.

        For single-value cursors (a name, an id): the cursor must be of ``first``'s
        type (``str`` or ``int``), an ``int`` within 64 bits and a ``str`` without
        NUL (nothing Postgres returns), or the token is INVALID_ARGUMENT.
        """
        if not token:
            return first
        cursor = self.decode(token, query)
        # The exact type: a JSON true is no integer cursor.
        if type(cursor) is not type(first) or not _storable(cursor):
            raise invalid_page_token()
        return cursor


def _storable(cursor: Any) -> bool:
    """Whether a column could hold ``cursor``: a bigint for an int, text (no NUL) for a str."""
    if isinstance(cursor, int):
        return cursor in _INT64
    if isinstance(cursor, str):
        return "\x00" not in cursor
    return True

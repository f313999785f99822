"""API key format and hashing, shared by the admin service (issues keys) and tests.

A key reads ``sk_<key_id>_<secret>``: the id (16 hex characters) finds the
row, the secret (43 URL-safe characters) proves possession. Only
HMAC-SHA256(pepper, secret) is stored; comparison is constant-time. The
pepper (``STRATA_KEY_PEPPER``) lives outside the database, so a stolen table
alone does not allow checking guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

__all__ = ["NewApiKey", "hash_secret", "new_api_key", "parse_api_key", "secrets_match"]

_KEY_RE = re.compile(r"sk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A freshly made key: what to store (id, hash) and what to show once (the whole key)."""

    key_id: str
    secret_hash: bytes
    api_key: str


def new_api_key(pepper: bytes) -> NewApiKey:
    """Make a key with a random id and secret."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewApiKey(key_id, hash_secret(pepper, secret), f"sk_{key_id}_{secret}")


def parse_api_key(api_key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(api_key)
    return None if match is None else (match[1], match[2])


def hash_secret(pepper: bytes, secret: str) -> bytes:
    """The stored form of ``secret``."""
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


def secrets_match(pepper: bytes, secret: str, stored_hash: bytes) -> bool:
    """Constant-time check of ``secret`` against a stored hash."""
    return hmac.compare_digest(hash_secret(pepper, secret), stored_hash)

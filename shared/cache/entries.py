"""How the revisioned cache keeps entries in Redis: keys, the entry format, the guarded-set and
lease scripts (Lua), and the invalidation messages its processes exchange."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from shared.cache.redisclient import slot_of

__all__ = [
    "DELETED",
    "DROP_PREFIX",
    "GUARDED_SET",
    "LEASE_PREFIX",
    "LEASE_SCRIPT",
    "MARKER",
    "REV_DIGITS",
    "VALUE",
    "CacheEntry",
    "by_slot",
    "decode_any_entry",
    "decode_entry",
    "encode_entry",
    "glob_escape",
    "invalidation_channel",
    "invalidation_message",
    "parse_invalidations",
    "redis_key_prefix",
]

Item = TypeVar("Item")

# Entry flags, ordered so that at one revision a value beats a bare marker.
MARKER = b"A"  # revision known, content not cached (too large, or invalidated)
DELETED = b"D"  # tombstone: absent as of this revision
VALUE = b"V"
REV_DIGITS = 20
# An invalidation message that drops every local entry under a key prefix.
DROP_PREFIX = b"P"
LEASE_PREFIX = b"L"  # a lease: "L" + token; entries start with a revision's digits

# KEYS[i] = entry key; ARGV[1] = the fill's lease, "" for a write; ARGV[2i] = the
# encoded entry; ARGV[2i+1] = its TTL in ms. A write replaces an absent key, a
# lease or an entry whose revision+flag prefix is lower; a fill only its own
# lease or such an entry. Returns how many were stored. One call per batch: a
# write-through of n entries is one command for redis-py to encode and parse, not n.
GUARDED_SET = """
local lease = ARGV[1]
local stored = 0
for i, key in ipairs(KEYS) do
  local new = ARGV[2 * i]
  local cur = redis.call('GET', key)
  local store
  if not cur then
    store = lease == ''
  elseif string.sub(cur, 1, 1) == 'L' then
    store = lease == '' or cur == lease
  else
    store = string.sub(cur, 1, 21) < string.sub(new, 1, 21)
  end
  if store then
    redis.call('SET', key, new, 'PX', ARGV[2 * i + 1])
    stored = stored + 1
  end
end
return stored
"""

# KEYS = keys a reader missed; ARGV[1] = its lease; ARGV[2] = the lease's TTL in ms.
# Takes each key that is absent or leased (the newest reader's lease wins);
# an entry that arrived meanwhile stays, and guards the fill by its revision.
LEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if not cur or string.sub(cur, 1, 1) == 'L' then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return 0
"""


def redis_key_prefix(name: str) -> bytes:
    """Where the cache named ``name`` ("kv", "tenants") keeps its entries in Redis."""
    return f"strata:cache:{name}:".encode()


def invalidation_channel(name: str) -> str:
    """The pub/sub channel on which the processes of cache ``name`` hear invalidations."""
    return f"strata:cache:invalidate:{name}"


def by_slot(prefix: bytes, items: Sequence[Item], key_of: Callable[[Item], bytes]) -> list[list[Item]]:
    """``items`` grouped by the cluster hash slot of ``prefix + key_of(item)``: a script's keys share one."""
    slots: dict[int, list[Item]] = {}
    for item in items:
        slots.setdefault(slot_of(prefix + key_of(item)), []).append(item)
    return list(slots.values())


def glob_escape(raw: bytes) -> bytes:
    """``raw`` with Redis glob metacharacters escaped (a literal prefix for SCAN MATCH)."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the cache knows of a key as of ``revision``: a payload, or that it is absent."""

    revision: int
    payload: bytes | None  # None: absent (tombstone)
    expires_at: float | None = None  # wall-clock epoch seconds; None: no expiry


def encode_entry(flag: bytes, entry: CacheEntry) -> bytes:
    """``entry`` as stored in Redis: revision digits, flag, expiry, "|", payload (a value's only)."""
    expires = b"" if entry.expires_at is None else repr(entry.expires_at).encode()
    payload = entry.payload if flag == VALUE and entry.payload is not None else b""
    return b"%020d" % entry.revision + flag + expires + b"|" + payload


def decode_entry(raw: bytes) -> CacheEntry | None:
    """The entry in ``raw``; None for a marker (a miss)."""
    if raw[REV_DIGITS : REV_DIGITS + 1] == MARKER:
        return None
    return decode_any_entry(raw)


def decode_any_entry(raw: bytes) -> CacheEntry:
    """The entry in ``raw``, a marker included (its payload None)."""
    flag = raw[REV_DIGITS : REV_DIGITS + 1]
    bar = raw.index(b"|", REV_DIGITS + 1)
    expires = raw[REV_DIGITS + 1 : bar]
    return CacheEntry(
        int(raw[:REV_DIGITS]),
        raw[bar + 1 :] if flag == VALUE else None,
        float(expires) if expires else None,
    )


def invalidation_message(key: bytes, encoded: bytes) -> bytes:
    """The invalidation of ``key`` at the revision ``encoded`` starts with."""
    # revision (20 digits) + key length (8 hex digits) + key; messages concatenate.
    return encoded[:REV_DIGITS] + b"%08x" % len(key) + key


def parse_invalidations(data: bytes) -> list[tuple[int, bytes]]:
    """(revision, key) of each invalidation in a message (they concatenate)."""
    found: list[tuple[int, bytes]] = []
    at = 0
    while at + REV_DIGITS + 8 <= len(data):
        revision = int(data[at : at + REV_DIGITS])
        size = int(data[at + REV_DIGITS : at + REV_DIGITS + 8], 16)
        start = at + REV_DIGITS + 8
        found.append((revision, data[start : start + size]))
        at = start + size
    return found

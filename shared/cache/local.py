"""The revisioned cache's in-process tier, and the counters the cache keeps."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from shared.cache.entries import MARKER, VALUE, CacheEntry

__all__ = ["CACHE_COUNTERS", "CacheStats", "LocalTier"]

# The counters a cache reports as its own (admin, Prometheus); CacheStats holds more.
CACHE_COUNTERS = ("local_hits", "redis_hits", "misses", "evictions", "invalidations_received", "redis_errors")


@dataclass(slots=True)
class CacheStats:
    """Counters since start; read by admin and benchmarks."""

    local_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    loads: int = 0
    coalesced: int = 0
    fills_refused: int = 0
    evictions: int = 0
    redis_errors: int = 0
    invalidations_received: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _LocalEntry:
    revision: int
    flag: bytes
    payload: bytes | None
    expires_at: float | None
    stale_after: float = field(default=0.0)


class LocalTier:
    """The in-process LRU of revisioned entries.

    An entry is replaced only by a newer revision (or, at one revision, a
    value by nothing but a value); a marker (revision known, content not
    kept) serves no read but still refuses older fills. Entries go stale
    ``ttl_s`` after they were stored.
    """

    def __init__(self, max_entries: int, ttl_s: float, stats: CacheStats) -> None:
        self._entries: OrderedDict[bytes, _LocalEntry] = OrderedDict()
        self._max = max_entries
        self._ttl_s = ttl_s
        self._stats = stats

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> CacheEntry | None:
        """The fresh entry for ``key`` (counted as a local hit), or None; a stale one is dropped."""
        local = self._entries.get(key)
        if local is None:
            return None
        if local.stale_after > now and (local.expires_at is None or local.expires_at > now):
            if local.flag != MARKER:
                self._entries.move_to_end(key)
                self._stats.local_hits += 1
                return CacheEntry(local.revision, local.payload, local.expires_at)
        elif local.flag != MARKER:
            del self._entries[key]
        return None

    def store(self, key: bytes, flag: bytes, entry: CacheEntry, *, force: bool = False) -> None:
        """Keep ``entry`` unless an entry as new is there (``force``: a write, which replaces its own
        revision); the least recently used entries go past the bound."""
        if self._max <= 0:
            return
        current = self._entries.get(key)
        if current is not None and not force and (current.revision, current.flag) >= (entry.revision, flag):
            self._stats.fills_refused += 1
            return
        if current is not None and force and current.revision > entry.revision:
            return
        self._entries[key] = _LocalEntry(
            entry.revision,
            flag,
            entry.payload if flag == VALUE else None,
            entry.expires_at,
            time.time() + self._ttl_s,
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self._stats.evictions += 1

    def discard(self, key: bytes) -> None:
        """Forget ``key``."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def drop_prefix(self, prefix: bytes) -> int:
        """Drop the entries whose key starts with ``prefix``; how many were dropped."""
        doomed = [key for key in self._entries if key.startswith(prefix)]
        for key in doomed:
            del self._entries[key]
        self._stats.invalidations_received += len(doomed)
        return len(doomed)

    def invalidate(self, revision: int, key: bytes) -> None:
        """Drop ``key`` if what is kept is older than ``revision`` (0: whatever is kept)."""
        self._stats.invalidations_received += 1
        local = self._entries.get(key)
        if local is not None and (revision == 0 or local.revision < revision):
            del self._entries[key]

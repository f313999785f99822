"""Two-tier, revision-guarded cache: an in-process LRU in front of Redis.

Every entry carries the revision of the row it was read from (or the write
that produced it). A store never replaces an entry with an older revision, in
either tier, so the classic fill race (a reader misses, reads the old row, a
writer commits and updates the cache, then the reader stores the old row)
cannot leave a stale entry: the late fill is refused.

That guard needs the newer entry to still be there. Redis may lose it between
the write and the late fill (a flush, a restart, an eviction, an invalidation),
so a reader takes a lease before it reads the database: a token stored under
each key it missed (:meth:`RevisionedCache.lease`). Its fill lands in Redis
only if the key still holds that token, or an older entry; a key found empty
means something came between, and the fill is refused (leases, as in
memcache's, after Nishtala et al., "Scaling Memcache at Facebook").

Writers call :meth:`RevisionedCache.record_writes` after commit and before
acknowledging, writing the new value (or a tombstone) through both tiers and
broadcasting the revision to other processes' LRUs over Redis pub/sub.
Concurrent misses for one key share one load. Redis down means the cache is
bypassed, never an error: writes that could not reach Redis are remembered
and replayed, and Redis is not read until they have been.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.answers import OverBudget
from shared.groupcommit import GroupCommit
from shared.redisclient import Redis, is_cluster, open_redis, ready, slot_of
from shared.settings import Settings
from shared.singleflight import SingleFlight

__all__ = [
    "CACHE_COUNTERS",
    "CacheEntry",
    "CacheStats",
    "RevisionedCache",
    "invalidate_prefix",
    "invalidation_channel",
    "redis_key_prefix",
]

_log = logging.getLogger(__name__)

# Entry flags, ordered so that at one revision a value beats a bare marker.
_MARKER = b"A"  # revision known, content not cached (too large, or invalidated)
_DELETED = b"D"  # tombstone: absent as of this revision
_VALUE = b"V"
_REV_DIGITS = 20
# The counters a cache reports as its own (admin, Prometheus); CacheStats holds more.
CACHE_COUNTERS = ("local_hits", "redis_hits", "misses", "evictions", "invalidations_received", "redis_errors")
# An invalidation message that drops every local entry under a key prefix.
_DROP_PREFIX = b"P"
# How often the invalidation listener looks up from Redis to see whether it should stop.
_POLL_S = 1.0
_WRITE_THROUGH_S = 0.5  # the Redis client's own socket timeout bounds each pipeline
_WRITE_THROUGH_PERSIST_S = 3.0  # how long a write-through keeps trying a Redis that times out

_LEASE_PREFIX = b"L"  # a lease: "L" + token; entries start with a revision's digits
_LEASE_MS = 10_000  # a load slower than this loses its lease (its fill is refused)

# KEYS[i] = entry key; ARGV[1] = the fill's lease, "" for a write; ARGV[2i] = the
# encoded entry; ARGV[2i+1] = its TTL in ms. A write replaces an absent key, a
# lease or an entry whose revision+flag prefix is lower; a fill only its own
# lease or such an entry. Returns how many were stored. One call per batch: a
# write-through of n entries is one command for redis-py to encode and parse, not n.
_GUARDED_SET = """
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
_LEASE = """
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


async def invalidate_prefix(redis: Redis, name: str, prefix: bytes) -> int:
    """Drop every entry of cache ``name`` whose key starts with ``prefix`` (b"": all), everywhere.

    Redis entries are unlinked; every process drops its local ones on hearing
    the broadcast. Returns how many Redis entries were removed. A fill that
    read Postgres before the call is refused: its lease is unlinked too.
    """
    pattern = _glob_escape(redis_key_prefix(name) + prefix) + b"*"
    removed = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += await redis.unlink(*batch)
            batch.clear()
    if batch:
        removed += await redis.unlink(*batch)
    await redis.publish(invalidation_channel(name), _DROP_PREFIX + prefix)
    return removed


def _by_slot(prefix: bytes, items: Sequence[Item], key_of: Callable[[Item], bytes]) -> list[list[Item]]:
    """``items`` grouped by the cluster hash slot of ``prefix + key_of(item)``: a script's keys share one."""
    slots: dict[int, list[Item]] = {}
    for item in items:
        slots.setdefault(slot_of(prefix + key_of(item)), []).append(item)
    return list(slots.values())


def _glob_escape(raw: bytes) -> bytes:
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the cache knows of a key as of ``revision``: a payload, or that it is absent."""

    revision: int
    payload: bytes | None  # None: absent (tombstone)
    expires_at: float | None = None  # wall-clock epoch seconds; None: no expiry


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


Loader = Callable[[], Awaitable[CacheEntry | None]]
Id = TypeVar("Id")  # what a batch caller names its keys by (a KV key, a record id)
Item = TypeVar("Item")


class RevisionedCache:
    """An LRU + Redis cache of revisioned entries under one key ``prefix``.

    ``redis`` may be None (local tier only). ``max_payload`` bounds what is
    stored: larger payloads are recorded as a revision marker (a miss that
    still refuses older fills).
    """

    def __init__(
        self,
        redis: Redis | None,
        *,
        prefix: str,
        local_entries: int = 100_000,
        ttl_s: float = 300.0,
        max_payload: int = 64 * 1024,
        redis_retry_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._name = prefix
        self._prefix = redis_key_prefix(prefix)
        self._channel = invalidation_channel(prefix)
        self._local: OrderedDict[bytes, _LocalEntry] = OrderedDict()
        self._local_max = local_entries
        self._ttl_s = ttl_s
        self._max_payload = max_payload
        self._redis_retry_s = redis_retry_s
        self._redis_down_until = 0.0
        self._pending: dict[bytes, bytes] = {}  # key → encoded entry not yet in Redis
        self._fills: SingleFlight[bytes, CacheEntry | None] = SingleFlight()
        self._set_script = redis.register_script(_GUARDED_SET) if redis is not None else None
        self._lease_script = redis.register_script(_LEASE) if redis is not None else None
        # Concurrent writers share one pipeline per round trip (see record_writes).
        self._write_through_group: GroupCommit[tuple[bytes, bytes, CacheEntry], None] = GroupCommit(
            self._write_through_batch, max_entries=1024, split_on=()
        )
        self._listener: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = CacheStats()

    @classmethod
    def for_service(cls, settings: Settings, prefix: str) -> RevisionedCache:
        """A started cache on ``settings``' Redis with its size and TTL, keys under ``prefix``."""
        cache = cls(
            open_redis(settings.redis_url),
            prefix=prefix,
            local_entries=settings.cache_local_entries,
            ttl_s=settings.cache_ttl_s,
        )
        cache.start()
        return cache

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start listening for other processes' invalidations (call inside the event loop)."""
        if self._redis is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="cache-invalidations")

    async def close(self) -> None:
        """Stop background tasks and close the Redis client.

        redis-py can swallow a cancellation that lands inside a blocking read,
        so the listener also stops on its own (it polls ``_closed`` every
        ``_POLL_S``); close never waits longer than that for it.
        """
        self._closed = True
        for task in (self._listener, self._replayer):
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=2 * _POLL_S)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # -- reads -------------------------------------------------------------

    async def get(self, key: bytes) -> CacheEntry | None:
        """The cached entry for ``key`` (a value or a tombstone), or None on a miss."""
        now = time.time()
        local = self._local.get(key)
        if local is not None:
            if local.stale_after > now and (local.expires_at is None or local.expires_at > now):
                if local.flag != _MARKER:
                    self._local.move_to_end(key)
                    self.stats.local_hits += 1
                    return CacheEntry(local.revision, local.payload, local.expires_at)
            elif local.flag != _MARKER:
                del self._local[key]
        if self._redis_usable():
            try:
                raw = cast("bytes | None", await self._redis.get(self._prefix + key))  # type: ignore[union-attr]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
            else:
                if raw is not None and not raw.startswith(_LEASE_PREFIX):
                    entry = _decode(raw)
                    if entry is not None and (entry.expires_at is None or entry.expires_at > now):
                        self.stats.redis_hits += 1
                        self._store_local(key, raw[_REV_DIGITS : _REV_DIGITS + 1], entry)
                        return entry
        self.stats.misses += 1
        return None

    async def load(self, key: bytes, loader: Loader) -> CacheEntry | None:
        """Cached entry, or ``loader()``'s result stored and returned.

        Concurrent misses for one key share one ``loader`` call. The loader
        returns the row with its revision, or None when absent (absence is not
        cached: it has no revision to guard it).
        """
        entry = await self.get(key)
        if entry is not None:
            return entry
        if self._fills.running(key):
            self.stats.coalesced += 1
        return await self._fills.do(key, lambda: self._fill_one(key, loader))

    async def _fill_one(self, key: bytes, loader: Loader) -> CacheEntry | None:
        self.stats.loads += 1
        lease = await self.lease([key])
        loaded = await loader()
        if loaded is not None:
            await self.fill(key, loaded, lease)
        return loaded

    async def load_many(
        self,
        ids: Sequence[Id],
        key_of: Callable[[Id], bytes],
        loader: Callable[[list[Id], int | None], Awaitable[dict[Id, CacheEntry]]],
        *,
        budget: int | None = None,
    ) -> dict[Id, CacheEntry]:
        """The cached entry of each of ``ids``, and ``loader(missed, left)``'s for the rest, stored.

        ``key_of`` gives an id's cache key. The loader returns what it found
        (ids absent from the database are left out, and from the result too).
        Misses are leased together, in one round trip, before the loader runs.
        ``budget``: the bytes the entries' payloads may take together; hits are
        counted as they come (:class:`shared.answers.OverBudget` as soon as
        they pass it), and the loader is given what they left (None: no budget)
        and raises OverBudget itself when its rows would pass that.
        """
        found: dict[Id, CacheEntry] = {}
        missed: list[Id] = []
        spent = 0
        for item in ids:
            entry = await self.get(key_of(item))
            if entry is None:
                missed.append(item)
                continue
            found[item] = entry
            spent += len(entry.payload or b"")
            if budget is not None and spent > budget:
                raise OverBudget
        if missed:
            self.stats.loads += 1
            lease = await self.lease([key_of(item) for item in missed])
            for item, entry in (await loader(missed, None if budget is None else budget - spent)).items():
                await self.fill(key_of(item), entry, lease)
                found[item] = entry
        return found

    async def lease(self, keys: Sequence[bytes]) -> bytes | None:
        """Lease ``keys`` before reading them from the database; the lease to :meth:`fill` with.

        None when Redis is not in use (bypassed, or it failed now): the fill
        then goes to the local tier alone, if Redis is still bypassed then.
        """
        if not keys or not self._redis_usable():
            return None
        assert self._redis is not None and self._lease_script is not None
        lease = _LEASE_PREFIX + os.urandom(8).hex().encode()
        redis, sha = self._redis, self._lease_script.sha

        async def take(group: Sequence[bytes]) -> None:
            await redis.evalsha(sha, len(group), *[self._prefix + key for key in group], lease, _LEASE_MS)

        try:
            groups = _by_slot(self._prefix, keys, bytes) if is_cluster(redis) else [list(keys)]
            await asyncio.gather(*(self._with_script(_LEASE, take, group) for group in groups))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return None
        return lease

    # -- writes ------------------------------------------------------------

    async def fill(self, key: bytes, entry: CacheEntry, lease: bytes | None) -> None:
        """Store an entry read from the database under ``lease`` (see :meth:`lease`).

        Redis decides first (it is shared by every process and survives this
        one's LRU evictions): it takes the entry only if the key still holds
        this lease or an older entry. Only a fill Redis accepted, or made while
        Redis is bypassed, reaches the local tier, which applies its own guard.
        """
        flag = self._flag_for(entry)
        if self._redis_usable() and key not in self._pending:
            if lease is None:  # Redis came back after this load began: its lease was never taken
                self.stats.fills_refused += 1
                return
            try:
                stored = await self._set_script(  # type: ignore[misc]
                    keys=[self._prefix + key], args=[lease, _encode(flag, entry), self._redis_ttl_ms(entry)]
                )
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
            else:
                if not stored:
                    self.stats.fills_refused += 1
                    return
        self._store_local(key, flag, entry)

    async def record_writes(self, writes: list[tuple[bytes, CacheEntry]]) -> None:
        """Publish committed writes (values or tombstones) to both tiers and other processes.

        Call after commit and before acknowledging. Writes recorded while a
        write-through is in flight go together in the next one: one Redis
        round trip per batch, however many writers. Every write tries Redis,
        even while reads bypass it: a write kept only in this process for
        replay leaves Redis with the older entry, for every other process
        and for this one's successor should it die first. If Redis cannot be
        reached (refused, or timing out for 3 s) the writes are kept and
        replayed later; until then this process does not read Redis.
        """
        encoded: list[tuple[bytes, bytes, CacheEntry]] = []
        for key, entry in writes:
            flag = self._flag_for(entry)
            self._store_local(key, flag, entry, force=True)
            encoded.append((key, _encode(flag, entry), entry))
        if self._redis is None or not encoded:
            return
        await asyncio.gather(*(self._write_through_group.submit(item, _WRITE_THROUGH_S) for item in encoded))

    async def _write_through_batch(
        self, encoded: Sequence[tuple[bytes, bytes, CacheEntry]], _timeout: float
    ) -> list[None]:
        # A batch that cannot reach Redis is kept for replay, never raised to its writers.
        # A slow Redis (a timeout) is tried again first, for a while: the writers are
        # acknowledged after this, and were this process to die with the batch only in
        # its replay set, Redis would keep the older entries for the next process to
        # serve. A Redis that refuses connections is gone, and comes back empty.
        give_up_at = time.monotonic() + _WRITE_THROUGH_PERSIST_S
        while True:
            try:
                await self._write_through(encoded)
                return [None] * len(encoded)
            except RedisTimeoutError as exc:
                if time.monotonic() < give_up_at:
                    self.stats.redis_errors += 1
                    continue  # the sets are revision-guarded: sending them again is harmless
                failure: BaseException = exc
            except (RedisError, OSError) as exc:
                failure = exc
            self._redis_failed(failure)
            for key, data, _ in encoded:
                self._remember(key, data)
            return [None] * len(encoded)

    async def _write_through(self, encoded: Sequence[tuple[bytes, bytes, CacheEntry]]) -> None:
        """The guarded sets of every entry (one script call per hash slot), then one invalidation message."""
        assert self._redis is not None and self._set_script is not None
        redis, sha = self._redis, self._set_script.sha
        message = b"".join(_invalidation(key, data) for key, data, _ in encoded)
        if is_cluster(redis):
            # A cluster pipeline carries no scripts: one call per slot, side by side.
            async def sets(group: Sequence[tuple[bytes, bytes, CacheEntry]]) -> None:
                await redis.evalsha(sha, len(group), *self._script_arguments(group))

            groups = _by_slot(self._prefix, encoded, lambda item: item[0])
            await asyncio.gather(*(self._with_script(_GUARDED_SET, sets, group) for group in groups))
            await redis.publish(self._channel, message)
            return

        async def pipelined(group: Sequence[tuple[bytes, bytes, CacheEntry]]) -> None:
            # EVALSHA itself: a Script object in a pipeline costs a SCRIPT EXISTS round trip first.
            async with redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(sha, len(group), *self._script_arguments(group))
                pipe.publish(self._channel, message)
                await pipe.execute()

        await self._with_script(_GUARDED_SET, pipelined, encoded)

    async def _with_script(
        self, source: str, send: Callable[[Sequence[Item]], Awaitable[None]], items: Sequence[Item]
    ) -> None:
        """``send(items)``, and once more after loading the script ``source`` if Redis lost it."""
        assert self._redis is not None
        try:
            await send(items)
        except NoScriptError:
            # A restarted or flushed Redis: load the script and send again (both scripts are idempotent).
            await self._redis.script_load(source)
            await send(items)

    def _script_arguments(self, encoded: Sequence[tuple[bytes, bytes, CacheEntry]]) -> list[bytes | int]:
        """_GUARDED_SET's keys, then no lease (a write), then its (entry, TTL) pairs."""
        keys: list[bytes | int] = [self._prefix + key for key, _, _ in encoded]
        return [*keys, b"", *(arg for _, data, entry in encoded for arg in (data, self._redis_ttl_ms(entry)))]

    async def invalidate(self, key: bytes) -> None:
        """Drop ``key`` from both tiers (for callers without a revision)."""
        self._local.pop(key, None)
        if self._redis_usable():
            try:
                await self._redis.delete(self._prefix + key)  # type: ignore[union-attr]
                await self._redis.publish(self._channel, _invalidation(key, b"0" * _REV_DIGITS))  # type: ignore[union-attr]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)

    async def invalidate_prefix(self, prefix: bytes) -> None:
        """Drop the entries whose key starts with ``prefix`` in every process (:func:`invalidate_prefix`)."""
        self.drop_local_prefix(prefix)
        if self._redis_usable():
            try:
                await invalidate_prefix(self._redis, self._name, prefix)  # type: ignore[arg-type]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)

    def clear_local(self) -> None:
        """Empty the in-process tier."""
        self._local.clear()

    def drop_local_prefix(self, prefix: bytes) -> int:
        """Drop the in-process entries whose key starts with ``prefix``; how many were dropped."""
        doomed = [key for key in self._local if key.startswith(prefix)]
        for key in doomed:
            del self._local[key]
        self.stats.invalidations_received += len(doomed)
        return len(doomed)

    def snapshot(self) -> dict[str, int]:
        """The counters and the local tier's size, for the process's published stats."""
        return {**self.stats.as_dict(), "local_entries": len(self._local)}

    # -- internals ---------------------------------------------------------

    def _flag_for(self, entry: CacheEntry) -> bytes:
        if entry.payload is None:
            return _DELETED
        return _VALUE if len(entry.payload) <= self._max_payload else _MARKER

    def _store_local(self, key: bytes, flag: bytes, entry: CacheEntry, *, force: bool = False) -> None:
        if self._local_max <= 0:
            return
        current = self._local.get(key)
        if current is not None and not force and (current.revision, current.flag) >= (entry.revision, flag):
            self.stats.fills_refused += 1
            return
        if current is not None and force and current.revision > entry.revision:
            return
        self._local[key] = _LocalEntry(
            entry.revision,
            flag,
            entry.payload if flag == _VALUE else None,
            entry.expires_at,
            time.time() + self._ttl_s,
        )
        self._local.move_to_end(key)
        while len(self._local) > self._local_max:
            self._local.popitem(last=False)
            self.stats.evictions += 1

    def _redis_ttl_ms(self, entry: CacheEntry) -> int:
        ttl = self._ttl_s
        if entry.expires_at is not None:
            ttl = min(ttl, entry.expires_at - time.time())
        return max(1, int(ttl * 1000))

    def _redis_usable(self) -> bool:
        return self._redis is not None and not self._pending and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        if time.monotonic() >= self._redis_down_until:
            _log.warning("redis unavailable; bypassing the cache tier", extra={"error": repr(exc)})
        self._redis_down_until = time.monotonic() + self._redis_retry_s

    def _remember(self, key: bytes, encoded: bytes) -> None:
        previous = self._pending.get(key)
        if previous is None or previous[: _REV_DIGITS + 1] < encoded[: _REV_DIGITS + 1]:
            self._pending[key] = encoded
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.create_task(self._replay(), name="cache-replay")

    async def _replay(self) -> None:
        # Writes Redis missed must land (guarded) before Redis is read again,
        # or an entry older than an acknowledged write could be served.
        assert self._redis is not None and self._set_script is not None
        while self._pending:
            await asyncio.sleep(max(0.05, self._redis_down_until - time.monotonic()))
            try:
                batch = list(self._pending.items())
                await self._write_through([(key, data, _decode_any(data)) for key, data in batch])
                for key, data in batch:
                    if self._pending.get(key) is data:
                        del self._pending[key]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
            except Exception as exc:
                # Never end with writes still pending: Redis would stay unread, and stale, for good.
                _log.exception("replaying cache writes failed; trying again")
                self._redis_failed(exc)
        _log.info("redis reachable again; cache tier back in use")

    async def _listen(self) -> None:
        assert self._redis is not None
        subscribed_before = False
        while not self._closed:
            try:
                pubsub = (await ready(self._redis)).pubsub(ignore_subscribe_messages=True)
            except Exception as exc:
                self._redis_failed(exc)
                await asyncio.sleep(self._redis_retry_s)
                continue
            try:
                await pubsub.subscribe(self._channel)
                if subscribed_before:
                    # Invalidations missed while unsubscribed: local entries may be stale.
                    self._local.clear()
                subscribed_before = True
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_S)
                    if message is None:
                        continue
                    data = message["data"]
                    if data.startswith(_DROP_PREFIX):
                        self.drop_local_prefix(data[len(_DROP_PREFIX) :])
                        continue
                    for revision, key in _parse_invalidations(data):
                        self._apply_invalidation(revision, key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                self._redis_failed(exc)
                await asyncio.sleep(self._redis_retry_s)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), _POLL_S)

    def _apply_invalidation(self, revision: int, key: bytes) -> None:
        self.stats.invalidations_received += 1
        local = self._local.get(key)
        if local is not None and (revision == 0 or local.revision < revision):
            del self._local[key]


def _encode(flag: bytes, entry: CacheEntry) -> bytes:
    expires = b"" if entry.expires_at is None else repr(entry.expires_at).encode()
    payload = entry.payload if flag == _VALUE and entry.payload is not None else b""
    return b"%020d" % entry.revision + flag + expires + b"|" + payload


def _decode(raw: bytes) -> CacheEntry | None:
    """The entry in ``raw``; None for a marker (a miss)."""
    if raw[_REV_DIGITS : _REV_DIGITS + 1] == _MARKER:
        return None
    return _decode_any(raw)


def _decode_any(raw: bytes) -> CacheEntry:
    flag = raw[_REV_DIGITS : _REV_DIGITS + 1]
    bar = raw.index(b"|", _REV_DIGITS + 1)
    expires = raw[_REV_DIGITS + 1 : bar]
    return CacheEntry(
        int(raw[:_REV_DIGITS]),
        raw[bar + 1 :] if flag == _VALUE else None,
        float(expires) if expires else None,
    )


def _invalidation(key: bytes, encoded: bytes) -> bytes:
    # revision (20 digits) + key length (8 hex digits) + key; messages concatenate.
    return encoded[:_REV_DIGITS] + b"%08x" % len(key) + key


def _parse_invalidations(data: bytes) -> list[tuple[int, bytes]]:
    found: list[tuple[int, bytes]] = []
    at = 0
    while at + _REV_DIGITS + 8 <= len(data):
        revision = int(data[at : at + _REV_DIGITS])
        size = int(data[at + _REV_DIGITS : at + _REV_DIGITS + 8], 16)
        start = at + _REV_DIGITS + 8
        found.append((revision, data[start : start + size]))
        at = start + size
    return found

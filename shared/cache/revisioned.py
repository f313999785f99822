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
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.api.answers import OverBudget
from shared.cache.entries import (
    DELETED,
    GUARDED_SET,
    LEASE_PREFIX,
    LEASE_SCRIPT,
    MARKER,
    REV_DIGITS,
    VALUE,
    CacheEntry,
    by_slot,
    decode_any_entry,
    decode_entry,
    encode_entry,
    invalidation_channel,
    invalidation_message,
    redis_key_prefix,
)
from shared.cache.groupcommit import GroupCommit
from shared.cache.invalidations import POLL_S, InvalidationListener, invalidate_prefix
from shared.cache.local import CacheStats, LocalTier
from shared.cache.redisclient import Redis, is_cluster, open_redis
from shared.cache.singleflight import SingleFlight
from shared.config.settings import Settings

__all__ = ["RevisionedCache"]

_log = logging.getLogger(__name__)

_WRITE_THROUGH_S = 0.5  # the Redis client's own socket timeout bounds each pipeline
_WRITE_THROUGH_PERSIST_S = 3.0  # how long a write-through keeps trying a Redis that times out

_LEASE_MS = 10_000  # a load slower than this loses its lease (its fill is refused)


Item = TypeVar("Item")
Loader = Callable[[], Awaitable[CacheEntry | None]]
Id = TypeVar("Id")  # what a batch caller names its keys by (a KV key, a record id)


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
        self.stats = CacheStats()
        self._local = LocalTier(local_entries, ttl_s, self.stats)
        self._ttl_s = ttl_s
        self._max_payload = max_payload
        self._redis_retry_s = redis_retry_s
        self._redis_down_until = 0.0
        self._pending: dict[bytes, bytes] = {}  # key → encoded entry not yet in Redis
        self._fills: SingleFlight[bytes, CacheEntry | None] = SingleFlight()
        self._set_script = redis.register_script(GUARDED_SET) if redis is not None else None
        self._lease_script = redis.register_script(LEASE_SCRIPT) if redis is not None else None
        # Concurrent writers share one pipeline per round trip (see record_writes).
        self._write_through_group: GroupCommit[tuple[bytes, bytes, CacheEntry], None] = GroupCommit(
            self._write_through_batch, max_entries=1024, split_on=()
        )
        self._listener = (
            InvalidationListener(redis, self._channel, self._local, self._redis_failed, redis_retry_s)
            if redis is not None
            else None
        )
        self._replayer: asyncio.Task[None] | None = None

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
        if self._listener is not None:
            self._listener.start()

    async def close(self) -> None:
        """Stop background tasks and close the Redis client."""
        if self._listener is not None:
            await self._listener.close()
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.wait({self._replayer}, timeout=2 * POLL_S)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # -- reads -------------------------------------------------------------

    async def get(self, key: bytes) -> CacheEntry | None:
        """The cached entry for ``key`` (a value or a tombstone), or None on a miss."""
        now = time.time()
        local = self._local.get(key, now)
        if local is not None:
            return local
        if self._redis_usable():
            try:
                raw = cast("bytes | None", await self._redis.get(self._prefix + key))  # type: ignore[union-attr]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
            else:
                if raw is not None and not raw.startswith(LEASE_PREFIX):
                    entry = decode_entry(raw)
                    if entry is not None and (entry.expires_at is None or entry.expires_at > now):
                        self.stats.redis_hits += 1
                        self._local.store(key, raw[REV_DIGITS : REV_DIGITS + 1], entry)
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
        counted as they come (:class:`shared.api.answers.OverBudget` as soon as
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
        lease = LEASE_PREFIX + os.urandom(8).hex().encode()
        redis, sha = self._redis, self._lease_script.sha

        async def take(group: Sequence[bytes]) -> None:
            await redis.evalsha(sha, len(group), *[self._prefix + key for key in group], lease, _LEASE_MS)

        try:
            groups = by_slot(self._prefix, keys, bytes) if is_cluster(redis) else [list(keys)]
            await asyncio.gather(*(self._with_script(LEASE_SCRIPT, take, group) for group in groups))
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
                    keys=[self._prefix + key],
                    args=[lease, encode_entry(flag, entry), self._redis_ttl_ms(entry)],
                )
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
            else:
                if not stored:
                    self.stats.fills_refused += 1
                    return
        self._local.store(key, flag, entry)

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
            self._local.store(key, flag, entry, force=True)
            encoded.append((key, encode_entry(flag, entry), entry))
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
        message = b"".join(invalidation_message(key, data) for key, data, _ in encoded)
        if is_cluster(redis):
            # A cluster pipeline carries no scripts: one call per slot, side by side.
            async def sets(group: Sequence[tuple[bytes, bytes, CacheEntry]]) -> None:
                await redis.evalsha(sha, len(group), *self._script_arguments(group))

            groups = by_slot(self._prefix, encoded, lambda item: item[0])
            await asyncio.gather(*(self._with_script(GUARDED_SET, sets, group) for group in groups))
            await redis.publish(self._channel, message)
            return

        async def pipelined(group: Sequence[tuple[bytes, bytes, CacheEntry]]) -> None:
            # EVALSHA itself: a Script object in a pipeline costs a SCRIPT EXISTS round trip first.
            async with redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(sha, len(group), *self._script_arguments(group))
                pipe.publish(self._channel, message)
                await pipe.execute()

        await self._with_script(GUARDED_SET, pipelined, encoded)

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
        """GUARDED_SET's keys, then no lease (a write), then its (entry, TTL) pairs."""
        keys: list[bytes | int] = [self._prefix + key for key, _, _ in encoded]
        return [*keys, b"", *(arg for _, data, entry in encoded for arg in (data, self._redis_ttl_ms(entry)))]

    async def invalidate(self, key: bytes) -> None:
        """Drop ``key`` from both tiers (for callers without a revision)."""
        self._local.discard(key)
        if self._redis_usable():
            try:
                await self._redis.delete(self._prefix + key)  # type: ignore[union-attr]
                await self._redis.publish(self._channel, invalidation_message(key, b"0" * REV_DIGITS))  # type: ignore[union-attr]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)

    async def invalidate_prefix(self, prefix: bytes) -> None:
        """Drop the entries whose key starts with ``prefix`` in every process (:func:`invalidate_prefix`)."""
        self._local.drop_prefix(prefix)
        if self._redis_usable():
            try:
                await invalidate_prefix(self._redis, self._name, prefix)  # type: ignore[arg-type]
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)

    def clear_local(self) -> None:
        """Empty the in-process tier."""
        self._local.clear()

    def snapshot(self) -> dict[str, int]:
        """The counters and the local tier's size, for the process's published stats."""
        return {**self.stats.as_dict(), "local_entries": len(self._local)}

    # -- internals ---------------------------------------------------------

    def _flag_for(self, entry: CacheEntry) -> bytes:
        if entry.payload is None:
            return DELETED
        return VALUE if len(entry.payload) <= self._max_payload else MARKER

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
        if previous is None or previous[: REV_DIGITS + 1] < encoded[: REV_DIGITS + 1]:
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
                await self._write_through([(key, data, decode_any_entry(data)) for key, data in batch])
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

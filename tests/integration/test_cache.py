"""RevisionedCache against a real Redis: guards, coalescing, broadcasts, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator

import pytest

from shared.api.answers import OverBudget
from shared.cache.entries import CacheEntry
from shared.cache.redisclient import open_redis
from shared.cache.revisioned import RevisionedCache


@pytest.fixture
async def make_cache(redis_url) -> AsyncIterator:
    caches: list[RevisionedCache] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def make(**options) -> RevisionedCache:
        cache = RevisionedCache(open_redis(redis_url), prefix=prefix, **options)
        cache.start()
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


@pytest.fixture
def redis_process(backends, redis_url, settings):
    if redis_url != settings.redis_url:
        pytest.skip("pauses the one Redis server (a cluster's masters: test_redis_cluster.py)")
    if backends.redis is None or backends.redis.pid is None:
        pytest.skip("needs the embedded Redis to pause it")
    return backends.redis


async def test_a_late_fill_never_replaces_a_newer_write(make_cache):
    cache = make_cache()
    reader_has_read = asyncio.Event()
    writer_done = asyncio.Event()

    async def slow_loader() -> CacheEntry:
        # The reader read revision 1 from the database ...
        reader_has_read.set()
        await writer_done.wait()
        return CacheEntry(1, b"old")

    load = asyncio.create_task(cache.load(b"k", slow_loader))
    await reader_has_read.wait()
    # ... a writer commits revision 2 and records it before the reader stores.
    await cache.record_writes([(b"k", CacheEntry(2, b"new"))])
    writer_done.set()
    await load
    assert (await cache.get(b"k")).payload == b"new"
    cache.clear_local()
    assert (await cache.get(b"k")).payload == b"new", "the Redis tier took the stale fill"
    assert cache.stats.fills_refused >= 1


@pytest.mark.parametrize("lost_by", ["flush", "invalidate"])
async def test_a_late_fill_is_refused_when_redis_lost_the_newer_write(make_cache, redis_url, lost_by):
    # Redis loses the newer entry between the write and the late fill (a flush, a
    # restart, an eviction, an invalidation): nothing is left to guard by revision.
    reader, writer = make_cache(local_entries=0), make_cache(local_entries=0)
    reader_has_read, lost = asyncio.Event(), asyncio.Event()

    async def slow_loader() -> CacheEntry:
        reader_has_read.set()
        await lost.wait()
        return CacheEntry(1, b"old")

    load = asyncio.create_task(reader.load(b"k", slow_loader))
    await reader_has_read.wait()
    await writer.record_writes([(b"k", CacheEntry(2, b"new"))])
    if lost_by == "flush":
        admin = open_redis(redis_url)
        await admin.flushall()
        await admin.aclose()
    else:
        await writer.invalidate(b"k")
    lost.set()
    assert (await load).payload == b"old"  # what this reader read is its own answer ...
    assert await reader.get(b"k") is None  # ... but it is not cached for anyone else
    assert reader.stats.fills_refused == 1
    # The next reader's load is cached as usual.
    assert await writer.load(b"k", _const(CacheEntry(2, b"new"))) == CacheEntry(2, b"new")
    assert (await reader.get(b"k")).payload == b"new"


async def test_of_two_readers_leasing_a_key_only_the_later_fills_it(make_cache):
    first, second = make_cache(local_entries=0), make_cache(local_entries=0)
    early = await first.lease([b"k"])
    late = await second.lease([b"k"])
    await first.fill(b"k", CacheEntry(1, b"early"), early)
    assert await first.get(b"k") is None and first.stats.fills_refused == 1
    await second.fill(b"k", CacheEntry(1, b"late"), late)
    assert (await first.get(b"k")).payload == b"late"


async def test_a_write_replaces_a_lease_and_the_leased_fill_then_needs_a_newer_revision(make_cache):
    cache = make_cache(local_entries=0)
    lease = await cache.lease([b"a", b"b"])
    await cache.record_writes([(b"a", CacheEntry(5, b"written"))])
    await cache.fill(b"a", CacheEntry(4, b"read-before"), lease)
    await cache.fill(b"b", CacheEntry(3, b"untouched"), lease)
    assert (await cache.get(b"a")).payload == b"written"
    assert (await cache.get(b"b")).payload == b"untouched"


async def test_load_many_leases_its_misses_and_keeps_what_was_cached(make_cache):
    cache = make_cache()
    await cache.record_writes([(b"cached", CacheEntry(7, b"from-a-write"))])
    asked: list[list[str]] = []

    async def loader(missed: list[str], left: int | None) -> dict[str, CacheEntry]:
        assert left is None  # no budget was given
        asked.append(missed)
        return {name: CacheEntry(1, name.encode()) for name in missed if name != "absent"}

    names = ["cached", "x", "y", "absent"]
    found = await cache.load_many(names, str.encode, loader)
    assert asked == [["x", "y", "absent"]]
    assert {name: entry.payload for name, entry in found.items()} == {
        "cached": b"from-a-write",
        "x": b"x",
        "y": b"y",
    }
    cache.clear_local()
    again = await cache.load_many(names, str.encode, loader)
    assert asked[-1] == ["absent"] and again == found


async def test_load_many_counts_its_hits_against_the_budget_and_gives_the_loader_what_is_left(make_cache):
    cache = make_cache()
    await cache.record_writes([(b"h1", CacheEntry(1, b"x" * 600)), (b"h2", CacheEntry(1, b"x" * 600))])
    given: list[int | None] = []

    async def loader(missed: list[str], left: int | None) -> dict[str, CacheEntry]:
        given.append(left)
        return {name: CacheEntry(1, b"m") for name in missed}

    found = await cache.load_many(["h1", "m1"], str.encode, loader, budget=1000)
    assert set(found) == {"h1", "m1"} and given == [400]
    with pytest.raises(OverBudget):  # the second hit passes the budget: the loader never runs
        await cache.load_many(["h1", "h2", "m2"], str.encode, loader, budget=1000)
    assert given == [400]


async def test_a_tombstone_refuses_older_fills(make_cache):
    cache = make_cache()
    await cache.record_writes([(b"k", CacheEntry(5, None))])
    await cache.fill(b"k", CacheEntry(4, b"resurrected"), await cache.lease([b"k"]))
    cache.clear_local()
    entry = await cache.get(b"k")
    assert entry is not None and entry.payload is None and entry.revision == 5


async def test_concurrent_misses_share_one_load(make_cache):
    cache = make_cache()
    calls = 0

    async def loader() -> CacheEntry:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return CacheEntry(1, b"v")

    results = await asyncio.gather(*(cache.load(b"k", loader) for _ in range(20)))
    assert calls == 1
    assert {r.payload for r in results} == {b"v"}
    assert cache.stats.coalesced == 19


async def test_large_payloads_are_not_stored_but_still_guard(make_cache):
    cache = make_cache(max_payload=10)
    await cache.record_writes([(b"k", CacheEntry(3, b"x" * 100))])
    assert await cache.get(b"k") is None
    await cache.fill(b"k", CacheEntry(2, b"small-old"), await cache.lease([b"k"]))
    assert await cache.get(b"k") is None


async def test_entries_expire_with_their_key(make_cache):
    import time

    cache = make_cache()
    await cache.fill(b"k", CacheEntry(1, b"v", expires_at=time.time() + 0.2), await cache.lease([b"k"]))
    assert (await cache.get(b"k")).payload == b"v"
    await asyncio.sleep(0.3)
    assert await cache.get(b"k") is None


async def test_a_write_in_one_process_evicts_the_entry_in_another(make_cache):
    writer, other = make_cache(), make_cache()
    await asyncio.sleep(0.2)  # both subscribed
    await other.fill(b"k", CacheEntry(1, b"old"), await other.lease([b"k"]))
    await writer.record_writes([(b"k", CacheEntry(2, b"new"))])
    for _ in range(50):
        entry = await other.get(b"k")
        if entry is not None and entry.payload == b"new":
            break
        await asyncio.sleep(0.02)
    assert entry.payload == b"new"
    assert other.stats.invalidations_received >= 1


async def test_redis_unreachable_means_bypass_not_error(settings):
    cache = RevisionedCache(
        open_redis("redis://127.0.0.1:1/0", timeout_s=0.2), prefix="down", local_entries=0
    )
    cache.start()
    try:
        assert await cache.get(b"k") is None
        assert await cache.lease([b"k"]) is None  # Redis unreachable: nothing to lease
        await cache.fill(b"k", CacheEntry(1, b"v"), None)
        await cache.record_writes([(b"k", CacheEntry(2, b"v2"))])
        assert await cache.load(b"k", _const(CacheEntry(3, b"v3"))) == CacheEntry(3, b"v3")
        assert cache.stats.redis_errors >= 1
    finally:
        await cache.close()


async def test_writes_missed_while_redis_was_paused_are_replayed_before_redis_is_read(
    make_cache, redis_process
):
    cache = make_cache(local_entries=0)
    await cache.record_writes([(b"k", CacheEntry(1, b"old"))])
    os.kill(redis_process.pid, signal.SIGSTOP)
    try:
        await cache.record_writes([(b"k", CacheEntry(2, b"new"))])  # times out: kept for replay
        assert await cache.get(b"k") is None, "read Redis while a write was pending"
    finally:
        os.kill(redis_process.pid, signal.SIGCONT)
    for _ in range(100):
        if await cache.get(b"k") is not None:
            break
        await asyncio.sleep(0.05)
    fresh = make_cache(local_entries=0)
    entry = await fresh.get(b"k")
    assert entry is not None and entry.payload == b"new"


async def test_a_write_through_outlasts_a_slow_redis_so_no_older_entry_outlives_its_writer(
    settings, redis_process
):
    # Redis stalls past the client's timeout for a moment, then answers. The write must be in
    # Redis when its writer hears back: held only in the writer's replay set, a writer that
    # died right after acknowledging would leave Redis with the older entry for everyone.
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    client = open_redis(settings.redis_url)
    writer = RevisionedCache(client, prefix=prefix, local_entries=0)
    writer.start()
    await writer.record_writes([(b"k", CacheEntry(1, b"old"))])
    # The next write needs a new connection, whose handshake the stalled Redis will not answer:
    # nothing of it is sent until Redis is back.
    await client.connection_pool.disconnect()
    os.kill(redis_process.pid, signal.SIGSTOP)
    resumed = asyncio.get_running_loop().call_later(0.8, os.kill, redis_process.pid, signal.SIGCONT)
    try:
        await writer.record_writes([(b"k", CacheEntry(2, b"new"))])
        assert writer.stats.redis_errors >= 1  # it did time out, and tried again
    finally:
        resumed.cancel()
        os.kill(redis_process.pid, signal.SIGCONT)
        await writer.close()  # the writer is gone at once: nothing is left to replay its writes
    reader = RevisionedCache(open_redis(settings.redis_url), prefix=prefix, local_entries=0)
    try:
        entry = await reader.get(b"k")
        assert entry is not None and entry.payload == b"new"
    finally:
        await reader.close()


async def test_a_write_right_after_a_failed_read_still_goes_to_redis(settings, redis_process):
    # A read timed out (Redis stalled a moment): reads bypass Redis for a while. A write made
    # then must still reach Redis before its writer hears back, or a writer dying right after
    # would leave the older entry in Redis for everyone.
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    writer = RevisionedCache(open_redis(settings.redis_url), prefix=prefix, local_entries=0)
    writer.start()
    await writer.record_writes([(b"k", CacheEntry(1, b"old"))])
    os.kill(redis_process.pid, signal.SIGSTOP)
    try:
        assert await writer.get(b"other") is None  # times out: Redis marked unusable for reads
    finally:
        os.kill(redis_process.pid, signal.SIGCONT)
    assert writer.stats.redis_errors >= 1
    try:
        await writer.record_writes([(b"k", CacheEntry(2, b"new"))])
    finally:
        await writer.close()  # gone at once: nothing is left to replay its writes
    reader = RevisionedCache(open_redis(settings.redis_url), prefix=prefix, local_entries=0)
    try:
        entry = await reader.get(b"k")
        assert entry is not None and entry.payload == b"new"
    finally:
        await reader.close()


def _const(entry: CacheEntry):
    async def load() -> CacheEntry:
        return entry

    return load


async def test_concurrent_writers_share_a_pipeline_and_survive_a_script_flush(make_cache, redis_url):
    writer, reader = make_cache(), make_cache()
    # A flushed script cache (as after a Redis restart) must not lose the next writes.
    admin = open_redis(redis_url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    await asyncio.gather(
        *(writer.record_writes([(f"k{i}".encode(), CacheEntry(i + 1, f"v{i}".encode()))]) for i in range(50))
    )
    for i in range(50):
        entry = await reader.get(f"k{i}".encode())  # the reader's local tier is empty: from Redis
        assert entry is not None and (entry.revision, entry.payload) == (i + 1, f"v{i}".encode())
    assert reader.stats.redis_hits == 50

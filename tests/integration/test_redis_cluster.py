"""Strata's Redis users on a real three-master Redis Cluster, and a master killed under them.

The cache and rate-limit suites run against the cluster too (their
``redis_url`` fixture); this module covers what only a cluster has: batches
whose keys live on several masters, operations over every node (prefix
invalidation, process stats), and a master lost mid-test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.ratelimit import RateLimiter
from shared.cache.entries import CacheEntry, redis_key_prefix
from shared.cache.invalidations import invalidate_prefix
from shared.cache.redisclient import open_redis, ready
from shared.cache.revisioned import RevisionedCache
from shared.observability.stats import ProcessReporter, read_process_stats
from shared.storage.slowlog import SlowLog, read_slow_queries
from tests.support.redis_cluster import RedisClusterProcesses

KEYS = [f"key-{i}".encode() for i in range(60)]


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    client = await ready(open_redis(redis_cluster.url))
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


@pytest.fixture
async def caches(redis_cluster: RedisClusterProcesses) -> AsyncIterator:
    made: list[RevisionedCache] = []
    prefix = f"rc-{uuid.uuid4().hex[:8]}"

    def make(**options) -> RevisionedCache:
        cache = RevisionedCache(open_redis(redis_cluster.url), prefix=prefix, **options)
        cache.start()
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


def _owner_port(client: RedisCluster, key: bytes) -> int:
    return int(client.get_node_from_key(key).port)


async def test_a_batch_spanning_every_master_is_written_through_and_read_elsewhere(caches, cluster_client):
    writer, reader = caches(), caches(local_entries=0)
    prefix = writer._prefix  # the Redis key names, to see where they live
    owners = {_owner_port(cluster_client, prefix + key) for key in KEYS}
    assert len(owners) == 3, "the keys should live on every master"
    await writer.record_writes([(key, CacheEntry(i + 1, b"v%d" % i)) for i, key in enumerate(KEYS)])
    for i, key in enumerate(KEYS):
        entry = await reader.get(key)
        assert entry is not None and (entry.revision, entry.payload) == (i + 1, b"v%d" % i)
    assert reader.stats.redis_hits == len(KEYS) and writer.stats.redis_errors == 0


async def test_invalidation_broadcasts_reach_every_process(caches):
    writer, other = caches(), caches()
    await writer.record_writes([(b"k", CacheEntry(1, b"one"))])
    assert (await other.get(b"k")).payload == b"one"  # now in other's local tier
    await writer.record_writes([(b"k", CacheEntry(2, b"two"))])
    for _ in range(100):
        entry = await other.get(b"k")
        if entry is not None and entry.payload == b"two":
            break
        await asyncio.sleep(0.02)
    assert entry is not None and entry.payload == b"two"
    assert other.stats.invalidations_received >= 1


async def test_prefix_invalidation_reaches_every_master(caches, cluster_client):
    writer = caches()
    await writer.record_writes([(key, CacheEntry(1, b"v")) for key in KEYS])
    name = writer._name
    removed = await invalidate_prefix(cluster_client, name, b"key-")
    assert removed == len(KEYS)
    left = [k async for k in cluster_client.scan_iter(match=redis_key_prefix(name) + b"*", count=1000)]
    assert left == []


async def test_process_stats_and_the_slow_query_log_work_on_a_cluster(redis_cluster, cluster_client):
    reporters = [
        ProcessReporter(open_redis(redis_cluster.url), component, 0.2, {"calls_in_flight": lambda: 3})
        for component in ("kv", "tenants", "vector")
    ]
    try:
        for reporter in reporters:
            await reporter.publish()
        snapshots = await read_process_stats(cluster_client)
        assert {s.component for s in snapshots} >= {"kv", "tenants", "vector"}
    finally:
        for reporter in reporters:
            await reporter.close()
    log = SlowLog(open_redis(redis_cluster.url), "kv")
    marker = f"SELECT pg_sleep(1) /* {uuid.uuid4().hex} */"
    log.record(marker, 1.5)
    try:
        for _ in range(100):
            if any(entry.statement == marker for entry in await read_slow_queries(cluster_client, 50)):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the slow statement never reached the stream")
    finally:
        await log.close()


async def test_a_master_killed_mid_test_bypasses_the_cache_fails_limits_open_and_loses_nothing(
    redis_cluster, caches, cluster_client
):
    writer, reader = caches(), caches(local_entries=0)
    prefix = writer._prefix
    victim = _owner_port(cluster_client, prefix + KEYS[0])
    on_victim = [key for key in KEYS if _owner_port(cluster_client, prefix + key) == victim]
    await writer.record_writes([(key, CacheEntry(1, b"before")) for key in KEYS])
    limiter = RateLimiter(open_redis(redis_cluster.url), rate=1, burst=1)
    limited_key = next(
        k
        for k in (uuid.uuid4().hex for _ in range(1000))
        if _owner_port(cluster_client, f"strata:ratelimit:{{{k}}}".encode()) == victim
    )
    redis_cluster.kill(victim)
    try:
        started = time.monotonic()
        # Writes carry on (the cache keeps them for replay), reads are answered (from the
        # database, here the loader): nothing raises, nothing waits long.
        await writer.record_writes([(key, CacheEntry(2, b"during")) for key in KEYS])
        loaded = await reader.load(on_victim[0], _const(CacheEntry(2, b"during")))
        assert loaded.payload == b"during"
        assert (await writer.get(KEYS[0])).payload == b"during"  # its own local tier
        for _ in range(3):  # a limit of 1/s, yet three calls pass: the limiter fails open
            await limiter.take(limited_key)
        assert time.monotonic() - started < 10
    finally:
        redis_cluster.restart(victim)
        await limiter.close()
    # Back: the writes made during the outage reach Redis (replayed, guarded), nothing older wins.
    deadline = time.monotonic() + 15
    fresh = caches(local_entries=0)
    while True:
        entries = [await fresh.get(key) for key in KEYS]
        if all(e is not None and e.payload == b"during" for e in entries):
            break
        assert time.monotonic() < deadline, [e and e.payload for e in entries]
        await asyncio.sleep(0.1)


def _const(entry: CacheEntry):
    async def load() -> CacheEntry:
        return entry

    return load

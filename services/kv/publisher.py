"""What a KV write tells the cache and the revision feed, after commit and before any answer.

:class:`WritePublisher` is the :class:`services.kv.store.WriteListener` the
store is built with: each put batch reports its committed writes (or, when a
statement was sent but never answered, its keys, which may have committed), so
no caller giving up can skip it; deletes report the same way.
"""

from __future__ import annotations

from services.kv.keyspace import KeyRange, cache_key
from services.kv.revisions import RevisionFeed
from services.kv.store import DeleteResult, WriteResult
from shared.cache.entries import CacheEntry
from shared.cache.revisioned import RevisionedCache

__all__ = ["WritePublisher"]


class WritePublisher:
    """Keeps one process's cache tiers (and every other process's, by pub/sub) and feed current."""

    def __init__(self, cache: RevisionedCache, feed: RevisionFeed) -> None:
        self._cache = cache
        self._feed = feed

    async def written(self, written: list[tuple[str, WriteResult]]) -> None:
        """A put batch's committed writes, (tenant, result) each: into the cache (one round trip) and feed."""
        entries = [
            (
                cache_key(tenant, kv.namespace, kv.key),
                CacheEntry(
                    result.revision,
                    kv.SerializeToString(),
                    kv.expire_time.ToNanoseconds() / 1e9 if kv.HasField("expire_time") else None,
                ),
            )
            for tenant, result in written
            for kv in result.kvs
        ]
        await self._cache.record_writes(entries)
        if written:
            self._feed.observe(max(result.revision for _, result in written))

    async def unknown(self, keys: list[tuple[str, str, str]]) -> None:
        """(tenant, namespace, key)s a write may or may not have reached: dropped from the cache."""
        for tenant, namespace, key in keys:
            await self._cache.invalidate(cache_key(tenant, namespace, key))

    async def deleted(self, tenant: str, namespace: str, result: DeleteResult) -> None:
        """A committed delete: tombstones, so no cache serves a deleted key (nor a late fill revives it)."""
        if not result.deleted:
            return
        await self._cache.record_writes(
            [
                (cache_key(tenant, namespace, kv.key), CacheEntry(result.revision, None))
                for kv in result.deleted
            ]
        )
        self._feed.observe(result.revision)

    async def delete_unknown(self, tenant: str, namespace: str, keys: KeyRange) -> None:
        """A delete of ``keys`` that may or may not have committed: the key, or the namespace, dropped."""
        if keys == KeyRange.single(keys.start):
            await self._cache.invalidate(cache_key(tenant, namespace, keys.start))
        else:
            await self._cache.invalidate_prefix(cache_key(tenant, namespace, ""))

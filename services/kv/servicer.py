"""``strata.kv.v1.KvService``: validation, cache and store, per RPC.

Reads go cache first (revision-guarded, see shared.cache.revisioned); writes go to
Postgres and, after commit and before the answer, through the cache, so a
caller that saw a write acknowledged never reads an older value afterwards.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from strata.internal.v1 import internal_pb2
from strata.kv.v1 import kv_pb2

from services.kv.keyspace import (
    KeyRange,
    Limits,
    cache_key,
    raise_if,
    revision_mismatch,
)
from services.kv.publisher import WritePublisher
from services.kv.revisions import FeedClosed, RevisionFeed
from services.kv.store import Change, DeleteResult, KvStore, PutItem, entry_to_kv
from shared.api.answers import OverBudget, answer_budget, page_rows, too_large
from shared.api.callers import current_caller
from shared.api.errors import Code, FieldViolation, StrataError, not_found
from shared.api.pagetoken import PageTokens
from shared.cache.entries import CacheEntry
from shared.cache.groupcommit import finish_despite_caller
from shared.cache.revisioned import RevisionedCache
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["KvServicer"]

_WATCH_BATCH = 500
_RETURN_PREVIOUS_LIMIT = 1000


class KvServicer:
    """Serves KvService from a :class:`KvStore`, a cache and a revision feed."""

    def __init__(
        self,
        store: KvStore,
        cache: RevisionedCache,
        publisher: WritePublisher,
        feed: RevisionFeed,
        limits: Limits,
        tokens: PageTokens,
    ) -> None:
        """``publisher``: the one ``store`` was built with (it tells cache and feed of puts; deletes
        are told here)."""
        self._store = store
        self._cache = cache
        self._publisher = publisher
        self._feed = feed
        self._limits = limits
        self._tokens = tokens

    # -- reads -------------------------------------------------------------

    async def Get(self, request: kv_pb2.GetRequest, context: Context) -> kv_pb2.GetResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        self._limits.key(request.key, errors)
        raise_if(errors)
        namespace, key = request.namespace, request.key

        async def load() -> CacheEntry | None:
            row = await self._store.get(tenant, namespace, key, timeout=deadline_timeout(context))
            return None if row is None else _cache_entry(namespace, row)

        entry = await self._cache.load(cache_key(tenant, namespace, key), load)
        if entry is None or entry.payload is None or _expired(entry):
            raise not_found("KEY_NOT_FOUND", f"key {key!r} not found", namespace=namespace, key=key)
        kv = kv_pb2.KeyValue.FromString(entry.payload)
        return kv_pb2.GetResponse(header=self._header(kv.mod_revision), kv=kv)

    async def BatchGet(self, request: kv_pb2.BatchGetRequest, context: Context) -> kv_pb2.BatchGetResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        self._limits.batch_size(len(request.keys), errors, "keys")
        for i, key in enumerate(request.keys):
            self._limits.key(key, errors, f"keys[{i}]")
        raise_if(errors)
        namespace = request.namespace
        keys = list(dict.fromkeys(request.keys))

        async def load(misses: list[str], left: int | None) -> dict[str, CacheEntry]:
            assert left is not None  # load_many is given a budget below
            rows = await self._store.get_many(
                tenant, namespace, misses, budget=left, timeout=deadline_timeout(context)
            )
            return {row["key"]: _cache_entry(namespace, row) for row in rows}

        budget = answer_budget(self._limits.max_message_bytes)
        try:
            entries = await self._cache.load_many(
                keys, lambda key: cache_key(tenant, namespace, key), load, budget=budget
            )
        except OverBudget:
            raise too_large(budget, "keys", "ask for fewer keys") from None
        found = {
            key: kv_pb2.KeyValue.FromString(entry.payload)
            for key, entry in entries.items()
            if entry.payload is not None and not _expired(entry)
        }
        kvs = [found[key] for key in keys if key in found]
        missing = [key for key in keys if key not in found]
        newest = max((kv.mod_revision for kv in kvs), default=0)
        return kv_pb2.BatchGetResponse(header=self._header(newest), kvs=kvs, missing_keys=missing)

    async def List(self, request: kv_pb2.ListRequest, context: Context) -> kv_pb2.ListResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        self._limits.key(request.prefix, errors, "prefix", allow_empty=True)
        self._limits.key(request.start_key, errors, "start_key", allow_empty=True)
        self._limits.key(request.end_key, errors, "end_key", allow_empty=True)
        page_size = self._limits.page_size(request.page_size, errors)
        raise_if(errors)
        namespace = request.namespace
        keys = KeyRange.prefix(request.prefix).intersect(request.start_key, request.end_key)
        # The tenant too: another tenant's token for the same namespace is not this query's.
        query = [
            "kv.List",
            tenant,
            namespace,
            request.prefix,
            request.start_key,
            request.end_key,
            request.keys_only,
        ]
        # The last key of the page before (PageTokens.cursor refuses anything else); None on the first page.
        after = self._tokens.cursor(request.page_token, query, "") if request.page_token else None
        timeout = deadline_timeout(context)
        budget = answer_budget(self._limits.max_message_bytes)
        rows, cut = await self._store.list_page(
            tenant,
            namespace,
            keys,
            after,
            page_size + 1,
            keys_only=request.keys_only,
            budget=budget,
            timeout=timeout,
        )
        kept, more = page_rows(rows, cut, page_size, budget=budget, item="value")
        kvs = [entry_to_kv(namespace, row) for row in kept]
        response = kv_pb2.ListResponse(kvs=kvs)
        if more:
            response.next_page_token = self._tokens.encode(query, kvs[-1].key)
        if request.include_total_size:
            response.total_size = await self._store.count(tenant, namespace, keys, timeout=timeout)
        response.header.CopyFrom(self._header(max((kv.mod_revision for kv in kvs), default=0)))
        return response

    # -- writes ------------------------------------------------------------

    async def Put(self, request: kv_pb2.PutRequest, context: Context) -> kv_pb2.PutResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        item = self._put_item(request, errors, "")
        raise_if(errors)
        # The batch that writes it tells the cache and the feed itself (the store's
        # WritePublisher), before answering anyone and even if this caller gives up.
        result = await self._store.put_many(
            tenant,
            request.namespace,
            [item],
            return_previous=request.return_previous,
            timeout=deadline_timeout(context),
        )
        if result.mismatch_key is not None:
            raise revision_mismatch(
                result.mismatch_key, item.if_revision or 0, result.mismatch_current, result.revision
            )
        kv = result.kvs[0]
        kv.value = b""
        response = kv_pb2.PutResponse(header=kv_pb2.ResponseHeader(revision=result.revision), kv=kv)
        if result.previous[0] is not None:
            response.previous.CopyFrom(result.previous[0])
        return response

    async def BatchPut(self, request: kv_pb2.BatchPutRequest, context: Context) -> kv_pb2.BatchPutResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        self._limits.batch_size(len(request.items), errors, "items")
        items = [self._put_item(item, errors, f"items[{i}].") for i, item in enumerate(request.items)]
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.key in seen:
                errors.append(FieldViolation(f"items[{i}].key", "appears more than once in the batch"))
            seen.add(item.key)
        raise_if(errors)
        result = await self._store.put_many(
            tenant, request.namespace, items, return_previous=False, timeout=deadline_timeout(context)
        )
        if result.mismatch_key is not None:
            expected = next(i.if_revision for i in items if i.key == result.mismatch_key)
            raise revision_mismatch(
                result.mismatch_key, expected or 0, result.mismatch_current, result.revision
            )
        for kv in result.kvs:
            kv.value = b""
        return kv_pb2.BatchPutResponse(header=kv_pb2.ResponseHeader(revision=result.revision), kvs=result.kvs)

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Context) -> kv_pb2.DeleteResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        keys = self._limits.target(request, errors)
        if request.WhichOneof("target") == "prefix" and request.HasField("if_revision"):
            errors.append(FieldViolation("if_revision", "only allowed when deleting one key"))
        if request.HasField("if_revision"):
            self._limits.if_revision(request.if_revision, errors)
        raise_if(errors)
        if_revision = request.if_revision if request.HasField("if_revision") else None
        result = await self._delete_published(
            tenant, request.namespace, keys, if_revision, request.return_previous, deadline_timeout(context)
        )
        if result.mismatch_key is not None:
            raise revision_mismatch(
                result.mismatch_key, if_revision or 0, result.mismatch_current, result.revision
            )
        # A delete that removed something answers its own revision; one that did not, the current one.
        header = (
            kv_pb2.ResponseHeader(revision=result.revision)
            if result.deleted
            else self._header(result.revision)
        )
        response = kv_pb2.DeleteResponse(header=header, deleted=len(result.deleted))
        if request.return_previous:
            response.previous.extend(result.deleted[:_RETURN_PREVIOUS_LIMIT])
        return response

    # -- watch -------------------------------------------------------------

    async def Watch(
        self, request: kv_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[kv_pb2.WatchResponse]:
        caller = current_caller()
        tenant = caller.tenant
        errors: list[FieldViolation] = []
        self._limits.namespace(request.namespace, errors)
        keys = self._limits.target(request, errors)
        if request.start_revision < 0:
            errors.append(FieldViolation("start_revision", "must be >= 0 (0: from now on)"))
        raise_if(errors)
        current, compacted = await self._store.revisions(timeout=deadline_timeout(context))
        self._feed.observe(current)
        start = request.start_revision or current + 1
        if start <= compacted:
            raise _compacted(start, compacted)
        yield kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=current), created=True)
        # A watch lasts at most this long, then the client resumes through the gateway,
        # which authenticates its key again.
        ends_at = time.monotonic() + self._limits.stream_max_age_s
        # Every matching change up to the cursor (revision, key) has been sent;
        # key None: all of that revision.
        cursor: tuple[int, str | None] = (start - 1, None)
        while True:
            if time.monotonic() >= ends_at:
                raise StrataError(
                    Code.UNAVAILABLE,
                    "STREAM_MAX_AGE",
                    f"a watch stays open at most {self._limits.stream_max_age_s:g} s; "
                    "watch again from resume_revision",
                    metadata={"resume_revision": str(_resume_revision(cursor))},
                )
            try:
                changes, current, compacted, tenant_uid = await self._store.changes_after(
                    tenant, request.namespace, keys, cursor, _WATCH_BATCH, timeout=deadline_timeout(context)
                )
            except StrataError as exc:
                # Tell the client where to resume (e.g. Postgres is restarting).
                exc.metadata["resume_revision"] = str(_resume_revision(cursor))
                raise
            # The stream belongs to the tenant the gateway resolved, not to its slug: once
            # that tenant is gone, nothing more is sent, whoever holds the slug now.
            if caller.tenant_uid and tenant_uid != caller.tenant_uid:
                raise _tenant_gone(tenant)
            if compacted > cursor[0] or (compacted == cursor[0] and cursor[1] is not None):
                raise _compacted(_resume_revision(cursor), compacted)
            if changes:
                events = _within_bytes(changes, answer_budget(self._limits.max_message_bytes))
                if len(events) == len(changes) < _WATCH_BATCH:
                    # Not a full batch, all of it sent: everything up to the snapshot's revision was read.
                    cursor = (max(current, changes[-1].revision), None)
                else:
                    last = changes[len(events) - 1]
                    cursor = (last.revision, last.kv.key)
                yield kv_pb2.WatchResponse(
                    header=kv_pb2.ResponseHeader(revision=max(current, cursor[0])), events=events
                )
                continue
            cursor = (max(cursor[0], current), None)
            try:
                await self._feed.wait_beyond(
                    cursor[0], timeout=min(5.0, max(0.0, ends_at - time.monotonic()))
                )
            except FeedClosed:
                raise StrataError(
                    Code.UNAVAILABLE,
                    "SHUTTING_DOWN",
                    "the server is shutting down; watch again from resume_revision",
                    metadata={"resume_revision": str(cursor[0] + 1)},
                ) from None

    # -- tenant lifecycle --------------------------------------------------

    async def PurgeTenant(
        self, request: internal_pb2.PurgeTenantRequest, context: Context
    ) -> internal_pb2.PurgeTenantResponse:
        """strata.internal.v1.TenantPurgeService: every key of a deleted tenant, as Delete removes keys."""
        if not request.tenant:
            raise_if([FieldViolation("tenant", "required")])
        deleted = 0
        timeout = deadline_timeout(context)
        for namespace in await self._store.namespaces(request.tenant, timeout=timeout):
            result = await self._delete_published(
                request.tenant, namespace, KeyRange("", None), None, False, timeout
            )
            deleted += len(result.deleted)
        return internal_pb2.PurgeTenantResponse(deleted=deleted)

    # -- helpers -----------------------------------------------------------

    def _put_item(
        self, item: kv_pb2.PutRequest | kv_pb2.BatchPutItem, errors: list[FieldViolation], path: str
    ) -> PutItem:
        self._limits.key(item.key, errors, f"{path}key")
        self._limits.value(item.value, errors, f"{path}value")
        self._limits.content_type(item.content_type, errors, f"{path}content_type")
        ttl_ms = self._limits.ttl_ms(item.ttl, item.HasField("ttl"), errors, f"{path}ttl")
        if_revision = item.if_revision if item.HasField("if_revision") else None
        if if_revision is not None:
            self._limits.if_revision(if_revision, errors, f"{path}if_revision")
        return PutItem(item.key, item.value, item.content_type, ttl_ms, if_revision)

    async def _delete_published(
        self,
        tenant: str,
        namespace: str,
        keys: KeyRange,
        if_revision: int | None,
        return_previous: bool,
        timeout: float,
    ) -> DeleteResult:
        """Delete ``keys``, then tell the cache and the revision feed - all of it even if the
        caller gives up meanwhile: a delete that may have committed must never leave the
        cache older than Postgres. One whose outcome is unknown drops the keys instead."""

        async def delete() -> DeleteResult:
            try:
                result = await self._store.delete_range(
                    tenant,
                    namespace,
                    keys,
                    if_revision=if_revision,
                    return_previous=return_previous,
                    timeout=timeout,
                )
            except BaseException:
                await self._publisher.delete_unknown(tenant, namespace, keys)
                raise
            await self._publisher.deleted(tenant, namespace, result)
            return result

        return await finish_despite_caller(delete())

    def _header(self, at_least: int) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(revision=max(self._feed.revision, at_least))


def _expiry(value: Any) -> float | None:
    return None if value is None else float(value.timestamp())


def _cache_entry(namespace: str, row: asyncpg.Record) -> CacheEntry:
    """A stored row as its key's cache entry: the ``KeyValue``, guarded by its mod revision."""
    kv = entry_to_kv(namespace, row)
    return CacheEntry(kv.mod_revision, kv.SerializeToString(), _expiry(row["expires_at"]))


def _expired(entry: CacheEntry) -> bool:
    return entry.expires_at is not None and entry.expires_at <= time.time()


def _within_bytes(changes: list[Change], budget: int) -> list[kv_pb2.Event]:
    """The events of the first ``changes`` whose message stays within ``budget`` bytes (one at least).

    A batch is cut by bytes as well as by count: ten 1 MiB values must not make
    a message over the limit, which every watcher would fail on at every retry.
    """
    events: list[kv_pb2.Event] = []
    size = 0
    for change in changes:
        event = kv_pb2.Event(type=change.kind, kv=change.kv)  # type: ignore[arg-type]
        size += event.ByteSize() + 8  # the field's tag and length
        if events and size > budget:
            break
        events.append(event)
    return events


def _tenant_gone(tenant: str) -> StrataError:
    return StrataError(
        Code.PERMISSION_DENIED,
        "TENANT_DELETED",
        f"tenant {tenant!r} of this watch was deleted",
        metadata={"tenant": tenant},
    )


def _resume_revision(cursor: tuple[int, str | None]) -> int:
    """Where a new watch picks up from ``cursor``: its revision again when only part of it was sent."""
    return cursor[0] + (0 if cursor[1] is not None else 1)


def _compacted(wanted: int, compacted: int) -> StrataError:
    return StrataError(
        Code.OUT_OF_RANGE,
        "REVISION_COMPACTED",
        f"revision {wanted} has been compacted; the oldest available is {compacted + 1}",
        metadata={"compact_revision": str(compacted)},
    )

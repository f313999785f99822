"""``strata.tenants.v1.RecordService``: tenant-scoped JSON records under row-level security.

Each RPC checks its request (:mod:`.checks`), runs its SQL through
:class:`RecordStore`, and answers. GetRecord and BatchGetRecords are served
from the cache; every write records its result (or a tombstone) there after
commit and before answering, versioned by ``cache_version``, so a late fill
can never bring back an older record.
"""

from __future__ import annotations

import json
import uuid

from google.protobuf import json_format
from strata.tenants.v1 import tenants_pb2

from services.tenants.names import record_cache_key
from services.tenants.records.checks import (
    MAX_BATCH,
    MAX_DATA,
    apply_mask,
    check_collection,
    check_id,
    mask_paths,
    order_by,
    raise_if,
    version_of,
)
from services.tenants.records.mapping import cache_entry, record_message
from services.tenants.records.store import EtagMismatch, RecordNotFound, RecordRow, RecordStore
from shared.api.answers import OverBudget, answer_budget, too_large
from shared.api.callers import current_caller
from shared.api.documents import document_json
from shared.api.errors import FieldViolation, StrataError, aborted, already_exists, not_found
from shared.api.pagetoken import PageTokens, page_size
from shared.cache.entries import CacheEntry
from shared.cache.revisioned import RevisionedCache
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["RecordServicer"]


class RecordServicer:
    """Serves RecordService from a :class:`RecordStore`, GetRecord and BatchGetRecords through a cache."""

    def __init__(
        self, store: RecordStore, cache: RevisionedCache, tokens: PageTokens, max_message_bytes: int
    ) -> None:
        """``max_message_bytes``: the largest answer sent (STRATA_MAX_MESSAGE_BYTES)."""
        self._store = store
        self._tokens = tokens
        self._cache = cache
        self._max_message_bytes = max_message_bytes

    async def CreateRecord(
        self, request: tenants_pb2.CreateRecordRequest, context: Context
    ) -> tenants_pb2.CreateRecordResponse:
        tenant = current_caller().tenant
        record = request.record
        errors: list[FieldViolation] = []
        check_collection(record.collection, "record.collection", errors)
        if record.id:
            check_id(record.id, "record.id", errors)
        if len(request.request_id) > 128:
            errors.append(FieldViolation("request_id", "must be at most 128 characters"))
        data = document_json(record.data, "record.data", errors, max_bytes=MAX_DATA)
        raise_if(errors)
        record_id = record.id or str(uuid.uuid4())
        row = await self._store.create(
            tenant, record.collection, record_id, data, request.request_id, timeout=deadline_timeout(context)
        )
        if row is None:
            raise already_exists("RECORD_ALREADY_EXISTS", f"record {record_id!r} exists", id=record_id)
        await self._publish(tenant, row)
        return tenants_pb2.CreateRecordResponse(record=record_message(row))

    async def GetRecord(
        self, request: tenants_pb2.GetRecordRequest, context: Context
    ) -> tenants_pb2.GetRecordResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        check_collection(request.collection, "collection", errors)
        check_id(request.id, "id", errors)
        raise_if(errors)

        async def load() -> CacheEntry | None:
            row = await self._store.get(
                tenant, request.collection, request.id, timeout=deadline_timeout(context)
            )
            return None if row is None else cache_entry(row)

        entry = await self._cache.load(record_cache_key(tenant, request.collection, request.id), load)
        if entry is None or entry.payload is None:
            raise _record_not_found(request.id)
        return tenants_pb2.GetRecordResponse(record=tenants_pb2.Record.FromString(entry.payload))

    async def BatchGetRecords(
        self, request: tenants_pb2.BatchGetRecordsRequest, context: Context
    ) -> tenants_pb2.BatchGetRecordsResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        check_collection(request.collection, "collection", errors)
        if not 0 < len(request.ids) <= MAX_BATCH:
            errors.append(FieldViolation("ids", f"must hold 1 to {MAX_BATCH} ids"))
        for i, record_id in enumerate(request.ids):
            check_id(record_id, f"ids[{i}]", errors)
        raise_if(errors)
        ids = list(dict.fromkeys(request.ids))

        async def load(misses: list[str], left: int | None) -> dict[str, CacheEntry]:
            assert left is not None
            rows = await self._store.get_many(
                tenant, request.collection, misses, budget=left, timeout=deadline_timeout(context)
            )
            return {row.id: cache_entry(row) for row in rows}

        budget = answer_budget(self._max_message_bytes)
        try:
            entries = await self._cache.load_many(
                ids,
                lambda record_id: record_cache_key(tenant, request.collection, record_id),
                load,
                budget=budget,
            )
        except OverBudget:
            raise too_large(budget, "ids", "ask for fewer ids") from None
        found = {
            record_id: tenants_pb2.Record.FromString(entry.payload)
            for record_id, entry in entries.items()
            if entry.payload is not None
        }
        return tenants_pb2.BatchGetRecordsResponse(
            records=[found[i] for i in ids if i in found],
            missing_ids=[i for i in ids if i not in found],
        )

    async def UpdateRecord(
        self, request: tenants_pb2.UpdateRecordRequest, context: Context
    ) -> tenants_pb2.UpdateRecordResponse:
        tenant = current_caller().tenant
        record = request.record
        errors: list[FieldViolation] = []
        check_collection(record.collection, "record.collection", errors)
        check_id(record.id, "record.id", errors)
        version = version_of(record.etag, "record.etag", errors)
        paths = mask_paths(request, errors)
        incoming = json_format.MessageToDict(record.data)
        raise_if(errors)

        def new_data(current: str) -> str:
            data = incoming if paths is None else apply_mask(json.loads(current), incoming, paths)
            text = document_json(data, "record.data", errors, max_bytes=MAX_DATA)
            raise_if(errors)
            return text

        try:
            row = await self._store.update(
                tenant, record.collection, record.id, version, new_data, timeout=deadline_timeout(context)
            )
        except (RecordNotFound, EtagMismatch) as exc:
            raise _refusal(exc, record.id) from None
        await self._publish(tenant, row)
        return tenants_pb2.UpdateRecordResponse(record=record_message(row))

    async def DeleteRecord(
        self, request: tenants_pb2.DeleteRecordRequest, context: Context
    ) -> tenants_pb2.DeleteRecordResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        check_collection(request.collection, "collection", errors)
        check_id(request.id, "id", errors)
        version = version_of(request.etag, "etag", errors)
        raise_if(errors)
        try:
            row, tombstone = await self._store.delete(
                tenant, request.collection, request.id, version, timeout=deadline_timeout(context)
            )
        except (RecordNotFound, EtagMismatch) as exc:
            raise _refusal(exc, request.id) from None
        await self._cache.record_writes(
            [(record_cache_key(tenant, request.collection, request.id), CacheEntry(tombstone, None))]
        )
        return tenants_pb2.DeleteRecordResponse(record=record_message(row))

    async def ListRecords(
        self, request: tenants_pb2.ListRecordsRequest, context: Context
    ) -> tenants_pb2.ListRecordsResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        check_collection(request.collection, "collection", errors)
        size = page_size(request.page_size, errors)
        order = order_by(request.order_by, errors)
        raise_if(errors)
        query = [
            "tenants.ListRecords",
            tenant,
            request.collection,
            request.filter.SerializeToString(deterministic=True).hex(),
            order.kind,
            order.field,
            order.descending,
        ]
        cursor = self._tokens.decode(request.page_token, query) if request.page_token else None
        budget = answer_budget(self._max_message_bytes)
        page = await self._store.list_page(
            tenant,
            request.collection,
            request.filter if request.HasField("filter") else None,
            order,
            cursor,
            size,
            include_total=request.include_total_size,
            budget=budget,
            timeout=deadline_timeout(context),
        )
        # A page ends at page_size records, or earlier where they would pass the message limit.
        response = tenants_pb2.ListRecordsResponse(
            records=[record_message(r) for r in page.rows], total_size=page.total
        )
        if page.cursor is not None:
            response.next_page_token = self._tokens.encode(query, page.cursor)
        return response

    async def _publish(self, tenant: str, row: RecordRow) -> None:
        # After commit, before the answer: the cache must not hold anything older.
        await self._cache.record_writes(
            [(record_cache_key(tenant, row.collection, row.id), cache_entry(row))]
        )


def _record_not_found(record_id: str) -> StrataError:
    return not_found("RECORD_NOT_FOUND", f"record {record_id!r} not found", id=record_id)


def _refusal(exc: RecordNotFound | EtagMismatch, record_id: str) -> StrataError:
    if isinstance(exc, EtagMismatch):
        return aborted("ETAG_MISMATCH", "the record changed since that etag")
    return _record_not_found(record_id)

"""``strata.tenants.v1.RecordService``: tenant-scoped JSON records under row-level security.

Every statement runs inside :meth:`Database.tenant_transaction` for the
caller's tenant, so Postgres itself filters rows; the SQL below never names
the tenant in a WHERE clause (only when inserting, where the policy's WITH
CHECK verifies it).
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import json_format, struct_pb2
from strata.tenants.v1 import tenants_pb2

from services.tenants.names import COLLECTION_RE, DOMAIN, record_cache_key
from shared.answers import (
    ROW_OVERHEAD_BYTES,
    OverBudget,
    answer_budget,
    cut_by_bytes,
    split_at_budget,
    too_large,
)
from shared.cache import CacheEntry, RevisionedCache
from shared.db import Database, deadline_timeout
from shared.documents import document_json, holds_nul
from shared.errors import FieldViolation, aborted, already_exists, invalid_argument, not_found
from shared.filters import SqlParams, compile_filter, json_path_sql, validate_path
from shared.identity import require_scope
from shared.pagetoken import decode_page_token, encode_page_token, invalid_page_token, page_size
from shared.timestamps import to_timestamp

__all__ = ["RecordServicer", "cache_entry", "record_etag"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
READ, WRITE = "tenants:read", "tenants:write"
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_DATA = 1024 * 1024
_MAX_BATCH = 1000
_COLUMNS = "collection, id, data, revision, created_at, updated_at, cache_version"
# The same, with the document rendered once: as the text the answer carries, and counts
# (shared.answers); FROM tenants.records, _RENDERED.
_LISTED_COLUMNS = "collection, id, doc.rendered AS data, revision, created_at, updated_at, cache_version"
_RENDERED = "LATERAL (SELECT data::text AS rendered) doc"


def _record_bytes(collection: str) -> str:
    """SQL for what a record adds to an answer: its document, id and collection."""
    return f"octet_length(doc.rendered) + octet_length(id) + {ROW_OVERHEAD_BYTES + len(collection.encode())}"


_TIME_ORDERS = {"create_time": "created_at", "update_time": "updated_at"}
# An etag this API issues (see record_etag); before per-incarnation etags it was r<revision>.
_ETAG_RE = re.compile(r"r(\d{1,18})(?:-(\d{1,18}))?")
# Matches no row: cache_version comes from a sequence that starts at 1.
_NEVER_CURRENT = 0
_ABSENT = object()  # a masked path missing from the update (a JSON null is a value)


def record_etag(row: asyncpg.Record) -> str:
    """The etag of a record row: ``r<revision>-<cache_version>``, opaque to callers.

    ``revision`` alone restarts at 1 when a record is deleted and re-created,
    so a deleted record's etag would fit its successor; ``cache_version`` is
    drawn from a sequence by every write, so the pair names one state of one
    incarnation and is never issued twice.
    """
    return f"r{row['revision']}-{row['cache_version']}"


def row_to_record(row: asyncpg.Record) -> tenants_pb2.Record:
    """A ``Record`` from a tenants.records row."""
    data = struct_pb2.Struct()
    data.update(json.loads(row["data"]))
    return tenants_pb2.Record(
        collection=row["collection"],
        id=row["id"],
        data=data,
        revision=row["revision"],
        etag=record_etag(row),
        create_time=to_timestamp(row["created_at"]),
        update_time=to_timestamp(row["updated_at"]),
    )


def cache_entry(row: asyncpg.Record) -> CacheEntry:
    """A record row as a cache entry, guarded by its cache_version."""
    return CacheEntry(row["cache_version"], row_to_record(row).SerializeToString())


class RecordServicer:
    """Serves RecordService from tenants.records, with GetRecord and BatchGetRecords cached.

    Every write records its result (or a tombstone) in the cache after commit
    and before answering, versioned by ``cache_version``, so a late fill can
    never bring back an older record.
    """

    def __init__(self, db: Database, cache: RevisionedCache, max_message_bytes: int) -> None:
        """``max_message_bytes``: the largest answer sent (STRATA_MAX_MESSAGE_BYTES)."""
        self._db = db
        self._cache = cache
        self._max_message_bytes = max_message_bytes

    async def CreateRecord(
        self, request: tenants_pb2.CreateRecordRequest, context: Context
    ) -> tenants_pb2.CreateRecordResponse:
        tenant = require_scope(WRITE).tenant
        record = request.record
        errors: list[FieldViolation] = []
        _check_collection(record.collection, "record.collection", errors)
        if record.id:
            _check_id(record.id, "record.id", errors)
        if len(request.request_id) > 128:
            errors.append(FieldViolation("request_id", "must be at most 128 characters"))
        data = document_json(record.data, "record.data", errors, max_bytes=_MAX_DATA)
        _raise(errors)
        record_id = record.id or str(uuid.uuid4())
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO tenants.records (tenant, collection, id, data, request_id) "
                f"VALUES ($1, $2, $3, $4::jsonb, nullif($5, '')) ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
                tenant,
                record.collection,
                record_id,
                data,
                request.request_id,
                timeout=timeout,
            )
            if row is None and request.request_id:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM tenants.records WHERE collection = $1 AND request_id = $2",
                    record.collection,
                    request.request_id,
                    timeout=timeout,
                )
        if row is None:
            raise already_exists(
                "RECORD_ALREADY_EXISTS", f"record {record_id!r} exists", domain=DOMAIN, id=record_id
            )
        await self._publish(tenant, row)
        return tenants_pb2.CreateRecordResponse(record=row_to_record(row))

    async def _publish(self, tenant: str, row: asyncpg.Record) -> None:
        # After commit, before the answer: the cache must not hold anything older.
        await self._cache.record_writes(
            [(record_cache_key(tenant, row["collection"], row["id"]), cache_entry(row))]
        )

    async def GetRecord(
        self, request: tenants_pb2.GetRecordRequest, context: Context
    ) -> tenants_pb2.GetRecordResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        _check_collection(request.collection, "collection", errors)
        _check_id(request.id, "id", errors)
        _raise(errors)
        timeout = deadline_timeout(context)

        async def load() -> CacheEntry | None:
            async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM tenants.records WHERE collection = $1 AND id = $2",
                    request.collection,
                    request.id,
                    timeout=timeout,
                )
            return None if row is None else cache_entry(row)

        entry = await self._cache.load(record_cache_key(tenant, request.collection, request.id), load)
        if entry is None or entry.payload is None:
            raise _record_not_found(request.id)
        return tenants_pb2.GetRecordResponse(record=tenants_pb2.Record.FromString(entry.payload))

    async def BatchGetRecords(
        self, request: tenants_pb2.BatchGetRecordsRequest, context: Context
    ) -> tenants_pb2.BatchGetRecordsResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        _check_collection(request.collection, "collection", errors)
        if not 0 < len(request.ids) <= _MAX_BATCH:
            errors.append(FieldViolation("ids", f"must hold 1 to {_MAX_BATCH} ids"))
        for i, record_id in enumerate(request.ids):
            _check_id(record_id, f"ids[{i}]", errors)
        _raise(errors)
        ids = list(dict.fromkeys(request.ids))

        async def load(misses: list[str], left: int | None) -> dict[str, CacheEntry]:
            assert left is not None
            timeout = deadline_timeout(context)
            read = (
                f"SELECT {_LISTED_COLUMNS}, {_record_bytes(request.collection)} AS answer_bytes "
                f"FROM tenants.records, {_RENDERED} WHERE collection = $1 AND id = ANY($2::text[])"
            )
            async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
                rows = await conn.fetch(
                    cut_by_bytes(read, "id", "$3"), request.collection, misses, left, timeout=timeout
                )
            rows, past = split_at_budget(rows, left)
            if past is not None:
                raise OverBudget
            return {row["id"]: cache_entry(row) for row in rows}

        budget = answer_budget(self._max_message_bytes)
        try:
            entries = await self._cache.load_many(
                ids,
                lambda record_id: record_cache_key(tenant, request.collection, record_id),
                load,
                budget=budget,
            )
        except OverBudget:
            raise too_large(budget, "ids", DOMAIN, "ask for fewer ids") from None
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
        tenant = require_scope(WRITE).tenant
        record = request.record
        errors: list[FieldViolation] = []
        _check_collection(record.collection, "record.collection", errors)
        _check_id(record.id, "record.id", errors)
        version = _version_of(request.etag, errors)
        paths = _mask_paths(request, errors)
        incoming = json_format.MessageToDict(record.data)
        _raise(errors)
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            current = await conn.fetchrow(
                "SELECT data, cache_version FROM tenants.records "
                "WHERE collection = $1 AND id = $2 FOR UPDATE",
                record.collection,
                record.id,
                timeout=timeout,
            )
            if current is None:
                raise _record_not_found(record.id)
            if version is not None and version != current["cache_version"]:
                raise aborted("ETAG_MISMATCH", "the record changed since that etag", domain=DOMAIN)
            data = incoming if paths is None else _apply_mask(json.loads(current["data"]), incoming, paths)
            text = document_json(data, "record.data", errors, max_bytes=_MAX_DATA)
            _raise(errors)
            row = await conn.fetchrow(
                "UPDATE tenants.records SET data = $3::jsonb, revision = revision + 1, updated_at = now(), "
                "cache_version = nextval('tenants.record_versions') "
                f"WHERE collection = $1 AND id = $2 RETURNING {_COLUMNS}",
                record.collection,
                record.id,
                text,
                timeout=timeout,
            )
        assert row is not None
        await self._publish(tenant, row)
        return tenants_pb2.UpdateRecordResponse(record=row_to_record(row))

    async def DeleteRecord(
        self, request: tenants_pb2.DeleteRecordRequest, context: Context
    ) -> tenants_pb2.DeleteRecordResponse:
        tenant = require_scope(WRITE).tenant
        errors: list[FieldViolation] = []
        _check_collection(request.collection, "collection", errors)
        _check_id(request.id, "id", errors)
        version = _version_of(request.etag, errors)
        _raise(errors)
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"DELETE FROM tenants.records WHERE collection = $1 AND id = $2 "
                f"AND ($3::bigint IS NULL OR cache_version = $3) "
                f"RETURNING {_COLUMNS}, nextval('tenants.record_versions') AS tombstone_version",
                request.collection,
                request.id,
                version,
                timeout=timeout,
            )
            if row is None:
                exists = await conn.fetchval(
                    "SELECT 1 FROM tenants.records WHERE collection = $1 AND id = $2",
                    request.collection,
                    request.id,
                    timeout=timeout,
                )
                if exists:
                    raise aborted("ETAG_MISMATCH", "the record changed since that etag", domain=DOMAIN)
                raise _record_not_found(request.id)
        await self._cache.record_writes(
            [
                (
                    record_cache_key(tenant, request.collection, request.id),
                    CacheEntry(row["tombstone_version"], None),
                )
            ]
        )
        return tenants_pb2.DeleteRecordResponse(record=row_to_record(row))

    async def ListRecords(
        self, request: tenants_pb2.ListRecordsRequest, context: Context
    ) -> tenants_pb2.ListRecordsResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        _check_collection(request.collection, "collection", errors)
        size = page_size(request.page_size, errors)
        sort, kind = _sort_key(request.order_by, errors)
        _raise(errors)
        params = SqlParams()
        collection = params.add(request.collection)
        where = compile_filter(
            request.filter if request.HasField("filter") else None, "data", params, domain=DOMAIN
        )
        query = [
            "tenants.ListRecords",
            tenant,
            request.collection,
            request.filter.SerializeToString(deterministic=True).hex(),
            request.order_by or "create_time",
            request.descending,
        ]
        conditions = [f"collection = {collection}", where]
        if request.page_token:
            cursor = decode_page_token(request.page_token, query, domain=DOMAIN)
            conditions.append(_after(cursor, sort, kind, request.descending, params))
        direction = "DESC" if request.descending else "ASC"
        limit = params.add(size + 1)
        budget = answer_budget(self._max_message_bytes)
        budget_param = params.add(budget)
        timeout = deadline_timeout(context)

        async def page(db: Database) -> tuple[list[asyncpg.Record], int]:
            # A read a streaming replica may serve (see Database.read_replica).
            async with db.tenant_transaction(tenant, timeout=timeout, read_only=True) as conn:
                # The document is rendered once, as the text the answer carries and counts.
                listed = (
                    f"SELECT {_LISTED_COLUMNS}, {sort} AS sort_key, "
                    f"{_record_bytes(request.collection)} AS answer_bytes FROM tenants.records, {_RENDERED} "
                    f"WHERE {' AND '.join(conditions)} "
                    f"ORDER BY {sort} {direction} NULLS LAST, id {direction} LIMIT {limit}"
                )
                order = f"sort_key {direction} NULLS LAST, id {direction}"
                rows = await conn.fetch(
                    cut_by_bytes(listed, order, budget_param), *params.values, timeout=timeout
                )
                total = 0
                if request.include_total_size:
                    count_params = SqlParams()
                    count_collection = count_params.add(request.collection)
                    count_where = compile_filter(
                        request.filter if request.HasField("filter") else None,
                        "data",
                        count_params,
                        domain=DOMAIN,
                    )
                    total = await conn.fetchval(
                        "SELECT count(*) FROM tenants.records "
                        f"WHERE collection = {count_collection} AND {count_where}",
                        *count_params.values,
                        timeout=timeout,
                    )
            return rows, total

        rows, total = await self._db.read_replica(page)
        rows, past = split_at_budget(rows, budget)
        cut = past is not None
        if cut and not rows:
            raise too_large(budget, "page_size", DOMAIN, "one record is larger than the message limit")
        # A page ends at page_size records, or earlier where they would pass the message limit.
        response = tenants_pb2.ListRecordsResponse(
            records=[row_to_record(r) for r in rows[:size]], total_size=int(total)
        )
        if cut or len(rows) > size:
            last = rows[:size][-1]
            response.next_page_token = encode_page_token(
                query, [_cursor_value(last["sort_key"], kind), last["id"]]
            )
        return response


def _raise(errors: list[FieldViolation]) -> None:
    if errors:
        raise invalid_argument(errors, domain=DOMAIN)


def _record_not_found(record_id: str) -> Exception:
    return not_found("RECORD_NOT_FOUND", f"record {record_id!r} not found", domain=DOMAIN, id=record_id)


def _check_collection(value: str, field: str, errors: list[FieldViolation]) -> None:
    if not COLLECTION_RE.fullmatch(value):
        errors.append(FieldViolation(field, "must be 1-64 characters of [A-Za-z0-9_-]"))


def _check_id(value: str, field: str, errors: list[FieldViolation]) -> None:
    if not _ID_RE.fullmatch(value):
        errors.append(FieldViolation(field, "must be 1-128 characters of [A-Za-z0-9_.:-]"))


def _version_of(etag: str, errors: list[FieldViolation]) -> int | None:
    """The cache_version ``etag`` names; None without an etag (or when it is not one of ours)."""
    if not etag:
        return None
    match = _ETAG_RE.fullmatch(etag)
    if match is None:
        errors.append(FieldViolation("etag", "is not an etag of this API"))
        return None
    # An etag of the old form (no version) was issued before this one: it names
    # no incarnation, so it is stale (ABORTED), not malformed.
    return int(match[2]) if match[2] else _NEVER_CURRENT


def _mask_paths(
    request: tenants_pb2.UpdateRecordRequest, errors: list[FieldViolation]
) -> list[list[str]] | None:
    """The data paths to change (as key lists), or None for a full replace."""
    paths = list(request.update_mask.paths)
    if not paths or "data" in paths:
        return None
    found: list[list[str]] = []
    for i, path in enumerate(paths):
        field = f"update_mask.paths[{i}]"
        if not path.startswith("data."):
            errors.append(FieldViolation(field, 'must be "data" or "data.<path>"'))
            continue
        if path in paths[:i]:
            errors.append(FieldViolation(field, "names a path named before"))
            continue
        found.append(validate_path(path.removeprefix("data."), field, errors))
    return found


def _apply_mask(current: dict[str, Any], incoming: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """``current`` with each masked path set from ``incoming``, or removed where incoming lacks it.

    A path present in ``incoming`` with a JSON null sets null: only absence removes.
    """
    for path in paths:
        source: Any = incoming
        for key in path:
            if not (isinstance(source, dict) and key in source):
                source = _ABSENT
                break
            source = source[key]
        if source is _ABSENT:
            _remove_path(current, path)
            continue
        target = current
        for key in path[:-1]:
            child = target.get(key)
            if not isinstance(child, dict):
                child = {}
                target[key] = child
            target = child
        target[path[-1]] = source
    return current


def _remove_path(document: dict[str, Any], path: list[str]) -> None:
    """Remove ``path`` from ``document``; an absent path (or parent) leaves it unchanged."""
    target: Any = document
    for key in path[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return  # no parent object: nothing there to remove, and nothing to create
    target.pop(path[-1], None)


def _sort_key(order_by: str, errors: list[FieldViolation]) -> tuple[str, str]:
    """(SQL expression, kind) for ``order_by``; kind is "time", "id" or "json"."""
    if not order_by or order_by in _TIME_ORDERS:
        return _TIME_ORDERS.get(order_by or "create_time", "created_at"), "time"
    if order_by == "id":
        return "id", "id"
    if order_by.startswith("data."):
        if validate_path(order_by.removeprefix("data."), "order_by", errors):
            return json_path_sql("data", order_by.removeprefix("data.")), "json"
        return "id", "id"
    errors.append(FieldViolation("order_by", 'must be "create_time", "update_time", "id" or "data.<path>"'))
    return "id", "id"


def _time_bound(value: Any) -> datetime.datetime:
    """A time cursor value: the ISO text of a timestamptz, so with its offset."""
    try:
        bound = datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        bound = None
    if bound is None or bound.tzinfo is None:
        raise invalid_page_token(DOMAIN)
    return bound


def _json_bound(value: Any) -> str:
    """A JSON cursor value: jsonb text as Postgres returned it (valid JSON, no NUL anywhere)."""
    if not isinstance(value, str):
        raise invalid_page_token(DOMAIN)
    try:
        nul = holds_nul(json.loads(value, parse_constant=_no_constant))  # jsonb cannot hold U+0000
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a stored value
        raise invalid_page_token(DOMAIN) from None
    if nul:
        raise invalid_page_token(DOMAIN)
    return value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are Python's JSON extensions, not JSON: jsonb refuses them.
    raise ValueError(name)


def _cursor_value(value: Any, kind: str) -> Any:
    if kind == "time":
        return value.isoformat()
    return value  # id: text; json: the jsonb value as text (asyncpg returns jsonb as str)


def _after(cursor: Any, sort: str, kind: str, descending: bool, params: SqlParams) -> str:
    """The keyset condition for rows after ``cursor`` in (sort NULLS LAST, id) order.

    The cursor is [sort value, id] as :func:`_cursor_value` wrote it; anything
    else (a token signed by us cannot hold it, but it is checked all the same
    so no cursor ever reaches a query it would fail in) is INVALID_ARGUMENT.
    """
    if not (isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[1], str)):
        raise invalid_page_token(DOMAIN)
    value, last_id = cursor
    if not _ID_RE.fullmatch(last_id):
        raise invalid_page_token(DOMAIN)
    beyond = "<" if descending else ">"
    after_id = params.add(last_id)
    if kind == "id":
        return f"id {beyond} {after_id}"
    if value is None:  # already among the records without the sort key
        return f"({sort} IS NULL AND id {beyond} {after_id})"
    cast = "::timestamptz" if kind == "time" else "::jsonb"
    bound = params.add(_time_bound(value) if kind == "time" else _json_bound(value))
    return (
        f"({sort} {beyond} {bound}{cast} OR ({sort} = {bound}{cast} AND id {beyond} {after_id}) "
        f"OR {sort} IS NULL)"
    )

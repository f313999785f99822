"""All of RecordService's SQL, over tenants.records, as typed rows.

Every statement runs inside :meth:`Database.tenant_transaction` for the
caller's tenant, so Postgres itself filters rows; the SQL below never names
the tenant in a WHERE clause (only when inserting, where the policy's WITH
CHECK verifies it). Reads that may be large are cut by bytes in Postgres
(:mod:`shared.api.answers`), each document rendered once, as the text both
counted and sent.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from strata.common.v1 import filter_pb2

from services.tenants.records.checks import ID_RE, OrderBy
from shared.api.answers import ROW_OVERHEAD_BYTES, OverBudget, cut_by_bytes, page_rows, split_at_budget
from shared.api.documents import holds_nul
from shared.api.pagetoken import invalid_page_token
from shared.storage.db import Database
from shared.storage.filters import SqlParams, compile_filter, json_path_sql

__all__ = ["EtagMismatch", "ListedPage", "RecordNotFound", "RecordRow", "RecordStore"]

_COLUMNS = "collection, id, data, revision, created_at, updated_at, cache_version"
# The same, with the document rendered once: as the text the answer carries, and counts;
# FROM tenants.records, _RENDERED.
_LISTED_COLUMNS = "collection, id, doc.rendered AS data, revision, created_at, updated_at, cache_version"
# OFFSET 0 keeps Postgres from pulling the subquery up into the outer query, where it would
# render data::text twice (once for the answer, once for octet_length), as EXPLAIN VERBOSE shows.
_RENDERED = "LATERAL (SELECT data::text AS rendered OFFSET 0) doc"
_TIME_COLUMNS = {"create_time": "created_at", "update_time": "updated_at"}


class RecordNotFound(Exception):
    """No record of that id in the collection."""


class EtagMismatch(Exception):
    """The record exists, but no longer at the version its etag names."""


@dataclass(frozen=True, slots=True)
class RecordRow:
    """A row of tenants.records; ``data`` is the document as JSON text."""

    collection: str
    id: str
    data: str
    revision: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    cache_version: int


@dataclass(frozen=True, slots=True)
class ListedPage:
    """A ListRecords page: its rows, whether they were cut by bytes, the next cursor, the total."""

    rows: list[RecordRow]
    cut: bool
    cursor: list[Any] | None  # [sort value, id] of the last row when there is more
    total: int


class RecordStore:
    """The records of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, tenant: str, collection: str, record_id: str, data: str, request_id: str, *, timeout: float
    ) -> RecordRow | None:
        """Insert a record; with ``request_id``, the record it made before if it is a retry.
        None when the id is taken."""
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO tenants.records (tenant, collection, id, data, request_id) "
                f"VALUES ($1, $2, $3, $4::jsonb, nullif($5, '')) ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
                tenant,
                collection,
                record_id,
                data,
                request_id,
                timeout=timeout,
            )
            if row is None and request_id:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM tenants.records WHERE collection = $1 AND request_id = $2",
                    collection,
                    request_id,
                    timeout=timeout,
                )
        return None if row is None else _record(row)

    async def get(self, tenant: str, collection: str, record_id: str, *, timeout: float) -> RecordRow | None:
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM tenants.records WHERE collection = $1 AND id = $2",
                collection,
                record_id,
                timeout=timeout,
            )
        return None if row is None else _record(row)

    async def get_many(
        self, tenant: str, collection: str, ids: Sequence[str], *, budget: int, timeout: float
    ) -> list[RecordRow]:
        """The records of ``ids`` that exist; :class:`OverBudget` if they pass ``budget`` bytes."""
        read = (
            f"SELECT {_LISTED_COLUMNS}, {_record_bytes(collection)} AS answer_bytes "
            f"FROM tenants.records, {_RENDERED} WHERE collection = $1 AND id = ANY($2::text[])"
        )
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            rows = await conn.fetch(
                cut_by_bytes(read, "id", "$3"), collection, list(ids), budget, timeout=timeout
            )
        fit, past = split_at_budget(rows, budget)
        if past is not None:
            raise OverBudget
        return [_record(r) for r in fit]

    async def update(
        self,
        tenant: str,
        collection: str,
        record_id: str,
        version: int | None,
        new_data: Callable[[str], str],
        *,
        timeout: float,
    ) -> RecordRow:
        """Replace the record's document with ``new_data(current document)``, the row locked meanwhile.

        ``version``: the cache_version the caller's etag names (None: any).
        Raises :class:`RecordNotFound` or :class:`EtagMismatch`.
        """
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            current = await conn.fetchrow(
                "SELECT data, cache_version FROM tenants.records "
                "WHERE collection = $1 AND id = $2 FOR UPDATE",
                collection,
                record_id,
                timeout=timeout,
            )
            if current is None:
                raise RecordNotFound
            if version is not None and version != current["cache_version"]:
                raise EtagMismatch
            row = await conn.fetchrow(
                "UPDATE tenants.records SET data = $3::jsonb, revision = revision + 1, updated_at = now(), "
                "cache_version = nextval('tenants.record_versions') "
                f"WHERE collection = $1 AND id = $2 RETURNING {_COLUMNS}",
                collection,
                record_id,
                new_data(current["data"]),
                timeout=timeout,
            )
        assert row is not None  # the row is locked
        return _record(row)

    async def delete(
        self, tenant: str, collection: str, record_id: str, version: int | None, *, timeout: float
    ) -> tuple[RecordRow, int]:
        """Delete the record (at ``version``, if given); the row as it was and its tombstone's version.

        Raises :class:`RecordNotFound` or :class:`EtagMismatch`.
        """
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"DELETE FROM tenants.records WHERE collection = $1 AND id = $2 "
                f"AND ($3::bigint IS NULL OR cache_version = $3) "
                f"RETURNING {_COLUMNS}, nextval('tenants.record_versions') AS tombstone_version",
                collection,
                record_id,
                version,
                timeout=timeout,
            )
            if row is None:
                exists = await conn.fetchval(
                    "SELECT 1 FROM tenants.records WHERE collection = $1 AND id = $2",
                    collection,
                    record_id,
                    timeout=timeout,
                )
                raise EtagMismatch if exists else RecordNotFound
        return _record(row), int(row["tombstone_version"])

    async def list_page(
        self,
        tenant: str,
        collection: str,
        matching: filter_pb2.Filter | None,
        order: OrderBy,
        cursor: Any,
        limit: int,
        *,
        include_total: bool,
        budget: int,
        timeout: float,
    ) -> ListedPage:
        """Up to ``limit`` records after ``cursor`` (a page token's, or None) in ``order`` (NULLS LAST,
        then id), cut where they would pass ``budget`` bytes (RESOURCE_EXHAUSTED when the first
        record alone would: :func:`shared.api.answers.page_rows`); a replica may serve it."""
        sort = _sort_sql(order)
        direction = "DESC" if order.descending else "ASC"
        params = SqlParams()
        conditions = [
            f"collection = {params.add(collection)}",
            compile_filter(matching, "data", params),
        ]
        if cursor is not None:
            conditions.append(_after(cursor, sort, order, params))
        listed = (
            f"SELECT {_LISTED_COLUMNS}, {sort} AS sort_key, {_record_bytes(collection)} AS answer_bytes "
            f"FROM tenants.records, {_RENDERED} WHERE {' AND '.join(conditions)} "
            f"ORDER BY {sort} {direction} NULLS LAST, id {direction} LIMIT {params.add(limit + 1)}"
        )
        order_sql = f"sort_key {direction} NULLS LAST, id {direction}"
        sql = cut_by_bytes(listed, order_sql, params.add(budget))

        async def page(db: Database) -> tuple[list[asyncpg.Record], int]:
            async with db.tenant_transaction(tenant, timeout=timeout, read_only=True) as conn:
                rows = await conn.fetch(sql, *params.values, timeout=timeout)
                total = 0
                if include_total:
                    counted = SqlParams()
                    where = compile_filter(matching, "data", counted)
                    total = await conn.fetchval(
                        f"SELECT count(*) FROM tenants.records WHERE collection = {counted.add(collection)} "
                        f"AND {where}",
                        *counted.values,
                        timeout=timeout,
                    )
            return rows, int(total)

        rows, total = await self._db.read_replica(page)
        fit, past = split_at_budget(rows, budget)
        kept, more = page_rows(fit, past is not None, limit, budget=budget, item="record")
        last = kept[-1] if more else None
        return ListedPage(
            [_record(r) for r in kept],
            past is not None,
            None if last is None else [_cursor_value(last["sort_key"], order), last["id"]],
            total,
        )


def _record(row: asyncpg.Record) -> RecordRow:
    return RecordRow(
        row["collection"],
        row["id"],
        row["data"],
        row["revision"],
        row["created_at"],
        row["updated_at"],
        row["cache_version"],
    )


def _record_bytes(collection: str) -> str:
    """SQL for what a record adds to an answer: its document, id and collection."""
    return f"octet_length(doc.rendered) + octet_length(id) + {ROW_OVERHEAD_BYTES + len(collection.encode())}"


def _sort_sql(order: OrderBy) -> str:
    if order.kind == "time":
        return _TIME_COLUMNS[order.field]
    if order.kind == "json":
        return json_path_sql("data", order.field)
    return "id"


def _cursor_value(value: Any, order: OrderBy) -> Any:
    if order.kind == "time":
        return value.isoformat()
    return value  # id: text; json: the jsonb value as text (asyncpg returns jsonb as str)


def _after(cursor: Any, sort: str, order: OrderBy, params: SqlParams) -> str:
    """The keyset condition for rows after ``cursor`` in (sort NULLS LAST, id) order.

    The cursor is [sort value, id] as :func:`_cursor_value` wrote it; anything
    else (a token signed by us cannot hold it, but it is checked all the same
    so no cursor ever reaches a query it would fail in) is INVALID_ARGUMENT.
    """
    if not (isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[1], str)):
        raise invalid_page_token()
    value, last_id = cursor
    if not ID_RE.fullmatch(last_id):
        raise invalid_page_token()
    beyond = "<" if order.descending else ">"
    after_id = params.add(last_id)
    if order.kind == "id":
        return f"id {beyond} {after_id}"
    if value is None:  # already among the records without the sort key
        return f"({sort} IS NULL AND id {beyond} {after_id})"
    cast = "::timestamptz" if order.kind == "time" else "::jsonb"
    bound = params.add(_time_bound(value) if order.kind == "time" else _json_bound(value))
    return (
        f"({sort} {beyond} {bound}{cast} OR ({sort} = {bound}{cast} AND id {beyond} {after_id}) "
        f"OR {sort} IS NULL)"
    )


def _time_bound(value: Any) -> datetime.datetime:
    """A time cursor value: the ISO text of a timestamptz, so with its offset."""
    try:
        bound = datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        bound = None
    if bound is None or bound.tzinfo is None:
        raise invalid_page_token()
    return bound


def _json_bound(value: Any) -> str:
    """A JSON cursor value: jsonb text as Postgres returned it (valid JSON, no NUL anywhere)."""
    if not isinstance(value, str):
        raise invalid_page_token()
    try:
        nul = holds_nul(json.loads(value, parse_constant=_no_constant))  # jsonb cannot hold U+0000
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a stored value
        raise invalid_page_token() from None
    if nul:
        raise invalid_page_token()
    return value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are Python's JSON extensions, not JSON: jsonb refuses them.
    raise ValueError(name)

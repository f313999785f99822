"""``strata.vector.v1.VectorService``: pgvector collections and top-k search per tenant.

Every statement runs in :meth:`Database.tenant_transaction`, so row-level
security keeps tenants apart. Distances use the collection's operator on
``embedding::vector(<dimension>)``, the expression its partial index is built
on, so the planner can use the index.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
import grpc
from strata.vector.v1 import vector_pb2

from shared.answers import ROW_OVERHEAD_BYTES, answer_budget, cut_by_bytes, split_at_budget, too_large
from shared.db import Database, deadline_timeout
from shared.documents import document_json
from shared.errors import FieldViolation, already_exists, invalid_argument, not_found
from shared.filters import SqlParams, compile_filter
from shared.identity import require_scope
from shared.pagetoken import encode_page_token, page_cursor, page_size
from shared.timestamps import to_timestamp

__all__ = ["VectorServicer"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
DOMAIN = "strata.vector.v1"
READ, WRITE = "vector:read", "vector:write"
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_BATCH = 1000
_MAX_SEARCHES = 100
_MAX_INDEXED_DIMENSION = 2000
_MAX_PAYLOAD = 64 * 1024
_KNOWN_COLLECTIONS = 10_000  # remembered (tenant, name) -> collection entries per process
_OPERATOR: dict[int, str] = {
    vector_pb2.METRIC_COSINE: "<=>",
    vector_pb2.METRIC_L2: "<->",
    vector_pb2.METRIC_INNER_PRODUCT: "<#>",
}
_NO_INDEX, _HNSW, _IVFFLAT = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Collection:
    id: int
    name: str
    dimension: int
    metric: int
    index_kind: int

    def distance(self, query: str) -> str:
        """SQL for the distance between each point and the query placeholder ``query``."""
        cast = f"::vector({self.dimension})"
        return f"(embedding{cast} {_OPERATOR[self.metric]} {query}{cast})"

    def score(self, distance: float) -> float:
        """Higher-is-closer score from a pgvector distance."""
        if self.metric == vector_pb2.METRIC_COSINE:
            return 1.0 - distance
        return -distance  # L2: negative distance; inner product: <#> is the negative dot product


def _raise(errors: list[FieldViolation]) -> None:
    if errors:
        raise invalid_argument(errors, domain=DOMAIN)


def _vector_text(
    vector: vector_pb2.Vector, collection: _Collection, field: str, errors: list[FieldViolation]
) -> str:
    """``vector`` as pgvector text for ``collection``, noting violations in ``errors``."""
    values = vector.values
    dimension = collection.dimension
    if not values:
        errors.append(FieldViolation(field, "required"))
        return ""
    if len(values) != dimension:
        errors.append(
            FieldViolation(field, f"has {len(values)} values; the collection's dimension is {dimension}")
        )
        return ""
    # Float32 values cannot overflow a double's sum: it is finite exactly when every value is.
    if not math.isfinite(sum(values)):
        errors.append(FieldViolation(field, "must hold finite numbers only (no NaN or infinity)"))
        return ""
    if collection.metric == vector_pb2.METRIC_COSINE and not any(values):
        # Cosine distance to a zero vector is undefined (NaN), and HNSW indexes leave it out.
        errors.append(FieldViolation(field, "must not be all zeros in a cosine collection"))
        return ""
    return str(list(values))  # "[0.5, 1.0, ...]": pgvector's text form (spaces allowed)


def _parse_vector(text: str) -> vector_pb2.Vector:
    return vector_pb2.Vector(values=[float(v) for v in text.strip("[]").split(",")] if text != "[]" else [])


def _point(row: asyncpg.Record, with_vectors: bool, with_payload: bool) -> vector_pb2.Point:
    point = vector_pb2.Point(id=row["id"])
    if with_vectors:
        point.vector.CopyFrom(_parse_vector(row["embedding"]))
    if with_payload:
        point.payload.update(json.loads(row["payload"]))
        point.text = row["text"]
    return point


def _columns(with_vectors: bool, with_payload: bool, dimension: int, table: str = "") -> str:
    """The columns a point read selects, and ``answer_bytes``: what the point adds to the answer
    (:mod:`shared.answers`), with the payload counted as the JSON text it is sent as."""
    columns = [f"{table}id"]
    size = f"octet_length({table}id) + {ROW_OVERHEAD_BYTES}"
    if with_vectors:
        columns.append(f"{table}embedding::text AS embedding")
        size += f" + {4 * dimension + 8}"
    if with_payload:
        columns += [f"{table}payload", f"{table}text"]
        size += f" + octet_length({table}payload::text) + octet_length({table}text)"
    return ", ".join([*columns, f"{size} AS answer_bytes"])


class VectorServicer:
    """Serves VectorService from the vector schema."""

    def __init__(self, db: Database, max_response_bytes: int = 8 * 1024 * 1024) -> None:
        """``max_response_bytes``: the largest answer sent (STRATA_MAX_MESSAGE_BYTES)."""
        self._db = db
        self._max_response = max_response_bytes
        # (tenant, name) -> collection, so a search need not look its collection
        # up first; every search re-checks it in its own statement (_search).
        self._known: OrderedDict[tuple[str, str], _Collection] = OrderedDict()

    # -- collections -------------------------------------------------------

    async def CreateCollection(
        self, request: vector_pb2.CreateCollectionRequest, context: Context
    ) -> vector_pb2.CreateCollectionResponse:
        tenant = require_scope(WRITE).tenant
        spec = request.collection
        errors: list[FieldViolation] = []
        if not _NAME_RE.fullmatch(spec.name):
            errors.append(FieldViolation("collection.name", "must be 1-64 characters of [A-Za-z0-9_-]"))
        if spec.metric not in _OPERATOR:
            errors.append(FieldViolation("collection.metric", "must be COSINE, L2 or INNER_PRODUCT"))
        index = _index_spec(spec, spec.dimension, "collection", errors)
        _raise(errors)
        timeout = max(deadline_timeout(context), 5.0)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await conn.fetchrow(
                "INSERT INTO vector.collections "
                "(tenant, name, dimension, metric, index_kind, hnsw_m, hnsw_ef_construction, ivfflat_lists) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING *",
                tenant,
                spec.name,
                spec.dimension,
                spec.metric,
                index.kind,
                index.m,
                index.ef_construction,
                index.lists,
                timeout=timeout,
            )
            if row is None:
                raise already_exists(
                    "COLLECTION_ALREADY_EXISTS",
                    f"collection {spec.name!r} exists",
                    domain=DOMAIN,
                    name=spec.name,
                )
            await conn.execute("SELECT vector.build_index($1)", row["id"], timeout=timeout)
        return vector_pb2.CreateCollectionResponse(collection=_describe(row, 0))

    async def GetCollection(
        self, request: vector_pb2.GetCollectionRequest, context: Context
    ) -> vector_pb2.GetCollectionResponse:
        tenant = require_scope(READ).tenant
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await self._collection_row(conn, request.name, "name", timeout)
            count = await conn.fetchval(
                "SELECT count(*) FROM vector.points WHERE collection_id = $1", row["id"], timeout=timeout
            )
        return vector_pb2.GetCollectionResponse(collection=_describe(row, int(count)))

    async def ListCollections(
        self, request: vector_pb2.ListCollectionsRequest, context: Context
    ) -> vector_pb2.ListCollectionsResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        _raise(errors)
        query = ["vector.ListCollections", tenant]
        after = page_cursor(request.page_token, query, "", domain=DOMAIN)
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            rows = await conn.fetch(
                "SELECT * FROM vector.collections WHERE name > $1 ORDER BY name LIMIT $2",
                str(after),
                size + 1,
                timeout=timeout,
            )
        response = vector_pb2.ListCollectionsResponse(collections=[_describe(r, 0) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = encode_page_token(query, rows[size - 1]["name"])
        return response

    async def DeleteCollection(
        self, request: vector_pb2.DeleteCollectionRequest, context: Context
    ) -> vector_pb2.DeleteCollectionResponse:
        tenant = require_scope(WRITE).tenant
        timeout = max(deadline_timeout(context), 5.0)
        self._known.pop((tenant, request.name), None)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await self._collection_row(conn, request.name, "name", timeout)
            # DROP INDEX first: it takes the table's exclusive lock before this
            # transaction holds any other lock on vector.points, so concurrent
            # deletes queue instead of deadlocking.
            await conn.execute("SELECT vector.drop_index($1)", row["id"], timeout=timeout)
            status = await conn.execute(
                "DELETE FROM vector.points WHERE collection_id = $1", row["id"], timeout=timeout
            )
            await conn.execute("DELETE FROM vector.collections WHERE id = $1", row["id"], timeout=timeout)
        return vector_pb2.DeleteCollectionResponse(points_deleted=int(status.split()[-1]))

    async def RebuildIndex(
        self, request: vector_pb2.RebuildIndexRequest, context: Context
    ) -> vector_pb2.RebuildIndexResponse:
        tenant = require_scope(WRITE).tenant
        # Building takes a while on a large collection: not less than a minute unless the caller says so.
        timeout = max(deadline_timeout(context), 60.0)
        self._known.pop((tenant, request.name), None)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            row = await self._collection_row(conn, request.name, "name", timeout)
            if request.WhichOneof("index") is not None:
                errors: list[FieldViolation] = []
                index = _index_spec(request, row["dimension"], "", errors)
                _raise(errors)
                row = await conn.fetchrow(
                    "UPDATE vector.collections SET index_kind = $2, hnsw_m = $3, "
                    "hnsw_ef_construction = $4, ivfflat_lists = $5 WHERE id = $1 RETURNING *",
                    row["id"],
                    index.kind,
                    index.m,
                    index.ef_construction,
                    index.lists,
                    timeout=timeout,
                )
            await conn.execute("SELECT vector.rebuild_index($1)", row["id"], timeout=timeout)
            count = await conn.fetchval(
                "SELECT count(*) FROM vector.points WHERE collection_id = $1", row["id"], timeout=timeout
            )
        return vector_pb2.RebuildIndexResponse(collection=_describe(row, int(count)))

    # -- points ------------------------------------------------------------

    async def UpsertPoints(
        self, request: vector_pb2.UpsertPointsRequest, context: Context
    ) -> vector_pb2.UpsertPointsResponse:
        tenant = require_scope(WRITE).tenant
        errors: list[FieldViolation] = []
        if not 0 < len(request.points) <= _MAX_BATCH:
            errors.append(FieldViolation("points", f"must hold 1 to {_MAX_BATCH} points"))
        _raise(errors)
        timeout = max(deadline_timeout(context), 5.0)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            collection = await self._collection(conn, request.collection, timeout)
            rows: list[tuple[str, str, str, str]] = []
            seen: set[str] = set()
            for i, point in enumerate(request.points):
                if not _ID_RE.fullmatch(point.id):
                    errors.append(
                        FieldViolation(f"points[{i}].id", "must be 1-128 characters of [A-Za-z0-9_.:-]")
                    )
                elif point.id in seen:
                    errors.append(FieldViolation(f"points[{i}].id", "appears more than once"))
                seen.add(point.id)
                vector = _vector_text(point.vector, collection, f"points[{i}].vector", errors)
                payload = document_json(point.payload, f"points[{i}].payload", errors, max_bytes=_MAX_PAYLOAD)
                if len(point.text.encode()) > _MAX_PAYLOAD or "\x00" in point.text:
                    errors.append(FieldViolation(f"points[{i}].text", "must be at most 64 KiB without NUL"))
                rows.append((point.id, vector, payload, point.text))
                if len(errors) >= 20:
                    break
            _raise(errors)
            # COPY into a staging table, then one INSERT … ON CONFLICT: the fast path for batches.
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS upsert_points "
                "(id text, embedding text, payload text, text text) ON COMMIT DELETE ROWS",
                timeout=timeout,
            )
            await conn.copy_records_to_table("upsert_points", records=rows, timeout=timeout)
            status = await conn.execute(
                f"INSERT INTO vector.points (collection_id, tenant, id, embedding, payload, text) "
                f"SELECT $1, $2, id, embedding::vector({collection.dimension}), payload::jsonb, text "
                f"FROM upsert_points "
                f"ON CONFLICT (collection_id, id) DO UPDATE SET "
                f"embedding = excluded.embedding, payload = excluded.payload, text = excluded.text",
                collection.id,
                tenant,
                timeout=timeout,
            )
        return vector_pb2.UpsertPointsResponse(upserted=int(status.split()[-1]))

    async def GetPoints(
        self, request: vector_pb2.GetPointsRequest, context: Context
    ) -> vector_pb2.GetPointsResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        if not 0 < len(request.ids) <= _MAX_BATCH:
            errors.append(FieldViolation("ids", f"must hold 1 to {_MAX_BATCH} ids"))
        _raise(errors)
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            collection = await self._collection(conn, request.collection, timeout)
            least = _least_bytes(len(set(request.ids)), collection.dimension, request.with_vectors)
            _refuse_over(least, self._max_response, "ids", "ask fewer ids, or leave with_vectors off")
            columns = _columns(request.with_vectors, request.with_payload, collection.dimension)
            budget = answer_budget(self._max_response)
            rows = await conn.fetch(
                cut_by_bytes(
                    f"SELECT {columns} FROM vector.points WHERE collection_id = $1 AND id = ANY($2::text[])",
                    "id",
                    "$3",
                ),
                collection.id,
                list(request.ids),
                budget,
                timeout=timeout,
            )
        rows, past = split_at_budget(rows, budget)
        if past is not None:
            raise too_large(budget, "ids", DOMAIN, "ask fewer ids, or leave with_payload off")
        found = {r["id"]: r for r in rows}
        ids = list(dict.fromkeys(request.ids))
        return vector_pb2.GetPointsResponse(
            points=[_point(found[i], request.with_vectors, request.with_payload) for i in ids if i in found],
            missing_ids=[i for i in ids if i not in found],
        )

    async def DeletePoints(
        self, request: vector_pb2.DeletePointsRequest, context: Context
    ) -> vector_pb2.DeletePointsResponse:
        tenant = require_scope(WRITE).tenant
        which = request.WhichOneof("selector")
        if which is None:
            _raise([FieldViolation("ids", "set ids or filter")])
        if which == "ids" and not 0 < len(request.ids.ids) <= _MAX_BATCH:
            _raise([FieldViolation("ids.ids", f"must hold 1 to {_MAX_BATCH} ids")])
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            collection = await self._collection(conn, request.collection, timeout)
            params = SqlParams()
            collection_id = params.add(collection.id)
            if which == "ids":
                condition = f"id = ANY({params.add(list(request.ids.ids))}::text[])"
            else:
                condition = compile_filter(request.filter, "payload", params, domain=DOMAIN)
            status = await conn.execute(
                f"DELETE FROM vector.points WHERE collection_id = {collection_id} AND {condition}",
                *params.values,
                timeout=timeout,
            )
        return vector_pb2.DeletePointsResponse(deleted=int(status.split()[-1]))

    async def CountPoints(
        self, request: vector_pb2.CountPointsRequest, context: Context
    ) -> vector_pb2.CountPointsResponse:
        tenant = require_scope(READ).tenant
        timeout = deadline_timeout(context)
        async with self._db.tenant_transaction(tenant, timeout=timeout) as conn:
            collection = await self._collection(conn, request.collection, timeout)
            params = SqlParams()
            collection_id = params.add(collection.id)
            where = compile_filter(
                request.filter if request.HasField("filter") else None, "payload", params, domain=DOMAIN
            )
            count = await conn.fetchval(
                f"SELECT count(*) FROM vector.points WHERE collection_id = {collection_id} AND {where}",
                *params.values,
                timeout=timeout,
            )
        return vector_pb2.CountPointsResponse(count=int(count))

    async def ScrollPoints(
        self, request: vector_pb2.ScrollPointsRequest, context: Context
    ) -> vector_pb2.ScrollPointsResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        _raise(errors)
        query = [
            "vector.ScrollPoints",
            tenant,
            request.collection,
            request.filter.SerializeToString(deterministic=True).hex(),
        ]
        after = page_cursor(request.page_token, query, "", domain=DOMAIN)
        timeout = deadline_timeout(context)
        budget = answer_budget(self._max_response)

        async def page(db: Database) -> list[asyncpg.Record]:
            async with db.tenant_transaction(tenant, timeout=timeout, read_only=True) as conn:
                collection = await self._collection(conn, request.collection, timeout)
                least = _least_bytes(size, collection.dimension, request.with_vectors)
                _refuse_over(
                    least, self._max_response, "page_size", "ask a smaller page, or leave with_vectors off"
                )
                params = SqlParams()
                collection_id = params.add(collection.id)
                wanted = request.filter if request.HasField("filter") else None
                where = compile_filter(wanted, "payload", params, domain=DOMAIN)
                columns = _columns(request.with_vectors, request.with_payload, collection.dimension)
                scrolled = (
                    f"SELECT {columns} FROM vector.points "
                    f"WHERE collection_id = {collection_id} AND id > {params.add(str(after))} AND {where} "
                    f"ORDER BY id LIMIT {params.add(size + 1)}"
                )
                found: list[asyncpg.Record] = await conn.fetch(
                    cut_by_bytes(scrolled, "id", params.add(budget)), *params.values, timeout=timeout
                )
            return found

        rows, past = split_at_budget(await self._db.read_replica(page), budget)
        if past is not None and not rows:
            raise too_large(budget, "page_size", DOMAIN, "one point is larger than the message limit")
        # A page ends at page_size points, or earlier where they would pass the message limit.
        response = vector_pb2.ScrollPointsResponse(
            points=[_point(r, request.with_vectors, request.with_payload) for r in rows[:size]]
        )
        if past is not None or len(rows) > size:
            response.next_page_token = encode_page_token(query, rows[:size][-1]["id"])
        return response

    # -- search ------------------------------------------------------------

    async def Search(self, request: vector_pb2.SearchRequest, context: Context) -> vector_pb2.SearchResponse:
        tenant = require_scope(READ).tenant
        timeout = deadline_timeout(context)
        _check_search(request, "")
        _check_answer_size([request], "", self._max_response)
        known = self._known.get((tenant, request.collection))
        if known is not None and len(request.vector.values) != known.dimension:
            known = None  # perhaps the collection was made again with another dimension: look it up
        settings = _plan_settings(known, request) if known is not None else None

        async def search(db: Database) -> vector_pb2.SearchResponse:
            transaction = db.tenant_transaction(tenant, timeout=timeout, settings=settings, read_only=True)
            async with transaction as conn:
                return await self._search(
                    conn, tenant, request, "", timeout, answer_budget(self._max_response), planned=known
                )

        return await self._db.read_replica(search)

    async def SearchBatch(
        self, request: vector_pb2.SearchBatchRequest, context: Context
    ) -> vector_pb2.SearchBatchResponse:
        tenant = require_scope(READ).tenant
        if not 0 < len(request.searches) <= _MAX_SEARCHES:
            _raise([FieldViolation("searches", f"must hold 1 to {_MAX_SEARCHES} searches")])
        for i, search in enumerate(request.searches):
            _check_search(search, f"searches[{i}].")
        # Refused before any work when the vectors asked for alone would pass the limit.
        _check_answer_size(request.searches, "searches", self._max_response)
        timeout = deadline_timeout(context)

        async def searches(db: Database) -> list[vector_pb2.SearchResponse]:
            results: list[vector_pb2.SearchResponse] = []
            budget = answer_budget(self._max_response)
            async with db.tenant_transaction(tenant, timeout=timeout, read_only=True) as conn:
                for i, search in enumerate(request.searches):
                    # Each search may take what the ones before it left of the answer.
                    results.append(
                        await self._search(conn, tenant, search, f"searches[{i}].", timeout, budget)
                    )
                    budget -= results[-1].ByteSize() + 8
            return results

        return vector_pb2.SearchBatchResponse(results=await self._db.read_replica(searches))

    async def HybridSearch(
        self, request: vector_pb2.HybridSearchRequest, context: Context
    ) -> vector_pb2.HybridSearchResponse:
        tenant = require_scope(READ).tenant
        errors: list[FieldViolation] = []
        limit = _limit(request.limit, "limit", errors)
        if not request.text.strip() or len(request.text) > 1000 or "\x00" in request.text:
            errors.append(FieldViolation("text", "must be 1-1000 characters without NUL"))
        candidates = request.candidates or 4 * limit
        if not limit <= candidates <= 10_000:
            errors.append(FieldViolation("candidates", "must be between limit and 10000"))
        k = request.rrf_k or 60
        if not 1 <= k <= 10_000:
            errors.append(FieldViolation("rrf_k", "must be between 1 and 10000"))
        _raise(errors)
        timeout = deadline_timeout(context)
        budget = answer_budget(self._max_response)

        async def fused(db: Database) -> list[asyncpg.Record]:
            async with db.tenant_transaction(tenant, timeout=timeout, read_only=True) as conn:
                collection = await self._collection(conn, request.collection, timeout)
                vector = _vector_text(request.vector, collection, "vector", errors)
                _raise(errors)
                params = SqlParams()
                collection_id = params.add(collection.id)
                wanted = request.filter if request.HasField("filter") else None
                where = compile_filter(wanted, "payload", params, domain=DOMAIN)
                query = params.add(vector)
                distance = collection.distance(query)
                text = params.add(request.text)
                columns = _columns(False, request.with_payload, collection.dimension, "p.")
                answer = (
                    f"SELECT {columns}, f.score, coalesce(f.distance, 0) AS distance FROM fused f "
                    f"JOIN vector.points p ON p.collection_id = {collection_id} AND p.id = f.id "
                    f"ORDER BY f.score DESC, f.id LIMIT {params.add(limit)}"
                )
                plan = _planner(collection.index_kind == _NO_INDEX, max(candidates, 100), 10)
                await _plan_search(conn, plan, timeout)
                found: list[asyncpg.Record] = await conn.fetch(
                    f"""
                    WITH by_vector AS MATERIALIZED (
                        SELECT id, {distance} AS distance FROM vector.points
                        WHERE collection_id = {collection_id} AND {where}
                        ORDER BY {distance} LIMIT {params.add(candidates)}
                    ), by_text AS MATERIALIZED (
                        SELECT id FROM vector.points
                        WHERE collection_id = {collection_id} AND {where}
                          AND tsv @@ plainto_tsquery('simple', {text})
                        ORDER BY ts_rank(tsv, plainto_tsquery('simple', {text})) DESC, id
                        LIMIT {params.add(candidates)}
                    ), ranked AS (
                        SELECT id, row_number() OVER (ORDER BY distance, id) AS rank, distance FROM by_vector
                        UNION ALL
                        SELECT id, row_number() OVER (), NULL FROM by_text
                    ), fused AS (
                        SELECT id, sum(1.0 / ({params.add(k)} + rank)) AS score, min(distance) AS distance
                        FROM ranked GROUP BY id
                    )
                    {cut_by_bytes(answer, "score DESC, id", params.add(budget))}
                    """,
                    *params.values,
                    timeout=timeout,
                )
            return found

        rows, past = split_at_budget(await self._db.read_replica(fused), budget)
        if past is not None:
            raise too_large(budget, "limit", DOMAIN, "ask fewer results or leave with_payload off")
        hits = []
        for row in rows:
            hit = vector_pb2.ScoredPoint(
                id=row["id"], score=float(row["score"]), distance=float(row["distance"])
            )
            if request.with_payload:
                hit.payload.update(json.loads(row["payload"]))
                hit.text = row["text"]
            hits.append(hit)
        return vector_pb2.HybridSearchResponse(hits=hits)

    async def _search(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        request: vector_pb2.SearchRequest,
        prefix: str,
        timeout: float,
        budget: int,
        planned: _Collection | None = None,
    ) -> vector_pb2.SearchResponse:
        """One checked search in ``conn``'s tenant transaction, whose hits may take ``budget`` bytes
        (RESOURCE_EXHAUSTED ``RESPONSE_TOO_LARGE`` past them, before their payloads are read).

        ``planned``: the collection as remembered, whose plan settings the
        transaction already carries. The query itself confirms it still
        exists unchanged (same id and index kind); when it returns nothing,
        the collection is looked up again and, if it changed, searched again.
        """
        collection = planned
        if collection is None:
            collection = await self._remembered(conn, tenant, request.collection, timeout, prefix)
            await _plan_search(conn, _plan_settings(collection, request), timeout)
        rows = await self._nearest(conn, request, collection, prefix, timeout, budget)
        if not rows and planned is not None:
            current = await self._remembered(conn, tenant, request.collection, timeout, prefix)
            if current != planned:
                await _plan_search(conn, _plan_settings(current, request), timeout)
                collection = current
                rows = await self._nearest(conn, request, collection, prefix, timeout, budget)

        def wanted(row: asyncpg.Record) -> bool:
            score = collection.score(float(row["distance"]))
            return not request.HasField("score_threshold") or score >= request.score_threshold

        rows, past = split_at_budget(rows, budget)
        # Hits come nearest first and a score falls with the distance: a point past the budget
        # that misses the threshold means every later one does too, and the answer is whole.
        if past is not None and wanted(past):
            raise too_large(
                budget,
                f"{prefix}limit" if prefix else "limit",
                DOMAIN,
                "ask fewer results or leave with_payload off",
            )
        hits = []
        for row in rows:
            if not wanted(row):
                continue
            score = collection.score(float(row["distance"]))
            point = _point(row, request.with_vectors, request.with_payload)
            hits.append(
                vector_pb2.ScoredPoint(
                    id=point.id,
                    score=score,
                    distance=float(row["distance"]),
                    vector=point.vector if request.with_vectors else None,
                    payload=point.payload if request.with_payload else None,
                    text=point.text,
                )
            )
        return vector_pb2.SearchResponse(hits=hits)

    async def _nearest(
        self,
        conn: asyncpg.Connection,
        request: vector_pb2.SearchRequest,
        collection: _Collection,
        prefix: str,
        timeout: float,
        budget: int,
    ) -> list[asyncpg.Record]:
        """The nearest points, nearest first, cut where they would pass ``budget`` bytes (cut_by_bytes)."""
        errors: list[FieldViolation] = []
        vector = _vector_text(request.vector, collection, f"{prefix}vector", errors)
        _raise(errors)
        params = SqlParams()
        collection_id = params.add(collection.id)
        where = compile_filter(
            request.filter if request.HasField("filter") else None,
            "payload",
            params,
            field=f"{prefix}filter",
            domain=DOMAIN,
        )
        exact = request.exact or collection.index_kind == _NO_INDEX
        distance = collection.distance(params.add(vector))
        # "+ 0" hides the distance from the planner's index matching: an exact
        # search scans the collection's rows (through the primary key) and sorts them.
        order = f"{distance} + 0" if exact else distance
        columns = _columns(request.with_vectors, request.with_payload, collection.dimension)
        # The EXISTS is evaluated once (an init plan): nothing is returned if the
        # collection was dropped or its index rebuilt as another kind meanwhile.
        # relaxed_order iterative scans may return near-ties out of order: sort the few hits again.
        rows: list[asyncpg.Record] = await conn.fetch(
            f"WITH hits AS MATERIALIZED ("
            f"SELECT {columns}, {distance} AS distance FROM vector.points "
            f"WHERE collection_id = {collection_id} AND {where} "
            f"AND EXISTS (SELECT FROM vector.collections WHERE id = {collection_id} "
            f"AND index_kind = {params.add(collection.index_kind)}) "
            f"ORDER BY {order} LIMIT {params.add(_limit_of(request.limit))}"
            f") {cut_by_bytes('SELECT * FROM hits', 'distance, id', params.add(budget))}",
            *params.values,
            timeout=timeout,
        )
        return rows

    # -- helpers -----------------------------------------------------------

    async def _collection_row(
        self, conn: asyncpg.Connection, name: str, field: str, timeout: float
    ) -> asyncpg.Record:
        if not _NAME_RE.fullmatch(name):
            _raise([FieldViolation(field, "must be 1-64 characters of [A-Za-z0-9_-]")])
        row = await conn.fetchrow("SELECT * FROM vector.collections WHERE name = $1", name, timeout=timeout)
        if row is None:
            raise not_found(
                "COLLECTION_NOT_FOUND", f"collection {name!r} not found", domain=DOMAIN, name=name
            )
        return row

    async def _collection(
        self, conn: asyncpg.Connection, name: str, timeout: float, field: str = "collection"
    ) -> _Collection:
        row = await self._collection_row(conn, name, field, timeout)
        return _Collection(row["id"], row["name"], row["dimension"], row["metric"], row["index_kind"])

    async def _remembered(
        self, conn: asyncpg.Connection, tenant: str, name: str, timeout: float, prefix: str
    ) -> _Collection:
        """Look ``name`` up and remember it for the next search (or forget it if gone)."""
        key = (tenant, name)
        self._known.pop(key, None)
        collection = await self._collection(conn, name, timeout, f"{prefix}collection")
        self._known[key] = collection
        if len(self._known) > _KNOWN_COLLECTIONS:
            self._known.popitem(last=False)
        return collection


@dataclass(frozen=True, slots=True)
class _IndexSpec:
    kind: int
    m: int
    ef_construction: int
    lists: int


def _index_spec(
    message: vector_pb2.Collection | vector_pb2.RebuildIndexRequest,
    dimension: int,
    prefix: str,
    errors: list[FieldViolation],
) -> _IndexSpec:
    """The index asked for by ``message``'s ``index`` oneof (unset: HNSW), checked against ``dimension``.

    Violations name fields under ``prefix`` ("collection" at creation, "" for a rebuild).
    """
    field = f"{prefix}." if prefix else ""
    chosen = message.WhichOneof("index") or "hnsw"
    kind = {"hnsw": _HNSW, "ivfflat": _IVFFLAT, "none": _NO_INDEX}[chosen]
    limit = _MAX_INDEXED_DIMENSION if kind != _NO_INDEX else 16000
    if not 1 <= dimension <= limit:
        # At creation the dimension is the caller's to change; on a rebuild, the index.
        where = f"{field}dimension" if prefix else chosen
        errors.append(FieldViolation(where, f"dimension must be between 1 and {limit} for this index"))
    spec = _IndexSpec(
        kind, message.hnsw.m or 16, message.hnsw.ef_construction or 64, message.ivfflat.lists or 100
    )
    if kind == _HNSW and not (
        2 <= spec.m <= 100 and 4 <= spec.ef_construction <= 1000 and spec.ef_construction >= 2 * spec.m
    ):
        errors.append(FieldViolation(f"{field}hnsw", "m must be 2-100, ef_construction 4-1000 and >= 2*m"))
    if kind == _IVFFLAT and not 1 <= spec.lists <= 32768:
        errors.append(FieldViolation(f"{field}ivfflat.lists", "must be between 1 and 32768"))
    return spec


def _limit(value: int, field: str, errors: list[FieldViolation]) -> int:
    if not 0 <= value <= 1000:
        errors.append(FieldViolation(field, "must be between 0 and 1000"))
    return _limit_of(value)


def _limit_of(value: int) -> int:
    return value or 10


# What a hit costs beyond its vector: id, score, distance, framing (payloads come on top).
_HIT_OVERHEAD_BYTES = 32


def _check_answer_size(searches: Iterable[vector_pb2.SearchRequest], field: str, budget: int) -> None:
    """INVALID_ARGUMENT when the vectors ``searches`` ask for could not fit in one answer.

    A hit's vector has the query vector's dimension, so ``limit`` hits of it
    take at least limit x (4 x dimension) bytes: known before any work, unlike
    payloads, which the search counts as it goes.
    """
    least = sum(_least_bytes(_limit_of(s.limit), len(s.vector.values), s.with_vectors) for s in searches)
    _refuse_over(
        least, budget, field or "limit", "ask fewer results, fewer searches, or leave with_vectors off"
    )


def _least_bytes(points: int, dimension: int, with_vectors: bool) -> int:
    """The fewest bytes ``points`` points (or hits) of ``dimension`` take in an answer."""
    return points * (_HIT_OVERHEAD_BYTES + (4 * dimension + 8 if with_vectors else 0))


def _refuse_over(least: int, budget: int, field: str, remedy: str) -> None:
    if least > budget:
        raise invalid_argument(
            [
                FieldViolation(
                    field,
                    f"the answer would hold at least {least} bytes (with vectors: 4 bytes a dimension), "
                    f"over the {budget}-byte message limit: {remedy}",
                )
            ],
            domain=DOMAIN,
        )


def _check_search(request: vector_pb2.SearchRequest, prefix: str) -> None:
    """A search's own fields (the collection and vector are checked against the collection later)."""
    errors: list[FieldViolation] = []
    _limit(request.limit, f"{prefix}limit", errors)
    if not 0 <= request.ef_search <= 1000:
        errors.append(FieldViolation(f"{prefix}ef_search", "must be between 0 and 1000"))
    if not 0 <= request.probes <= 32768:
        errors.append(FieldViolation(f"{prefix}probes", "must be between 0 and 32768"))
    if request.HasField("score_threshold") and not math.isfinite(request.score_threshold):
        errors.append(FieldViolation(f"{prefix}score_threshold", "must be a finite number"))
    _raise(errors)


def _plan_settings(collection: _Collection, request: vector_pb2.SearchRequest) -> dict[str, str]:
    """The transaction settings for a search of ``collection`` (see :func:`_plan_search`)."""
    exact = request.exact or collection.index_kind == _NO_INDEX
    return _planner(exact, request.ef_search or max(100, _limit_of(request.limit)), request.probes or 10)


def _planner(exact: bool, ef_search: int, probes: int) -> dict[str, str]:
    """Planner and index settings for the next nearest-neighbour query of a transaction.

    Approximate: sorting is disabled, so the planner walks the collection's
    ANN index instead of sorting the rows it expects (without fresh
    statistics it expects few, and every search would be a full scan), and
    iterative scans keep reading the index until LIMIT rows pass the filter.
    Custom plans always: a generic plan cannot use a collection's partial
    index (its predicate names the collection id), and Postgres switches a
    prepared statement to one after a few executions.
    """
    return {
        "plan_cache_mode": "force_custom_plan",
        "enable_sort": "on" if exact else "off",
        "hnsw.ef_search": str(ef_search),
        "hnsw.iterative_scan": "relaxed_order",
        "ivfflat.probes": str(probes),
        "ivfflat.iterative_scan": "relaxed_order",
    }


async def _plan_search(conn: asyncpg.Connection, settings: dict[str, str], timeout: float) -> None:
    """Apply :func:`_planner`'s ``settings`` to the rest of ``conn``'s transaction."""
    names = list(settings)
    await conn.execute(
        "SELECT " + ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(names))),
        *[part for name in names for part in (name, settings[name])],
        timeout=timeout,
    )


def _describe(row: asyncpg.Record, point_count: int) -> vector_pb2.Collection:
    collection = vector_pb2.Collection(
        name=row["name"],
        dimension=row["dimension"],
        metric=row["metric"],
        create_time=to_timestamp(row["created_at"]),
        point_count=point_count,
    )
    if row["index_kind"] == _HNSW:
        collection.hnsw.CopyFrom(
            vector_pb2.HnswIndex(m=row["hnsw_m"], ef_construction=row["hnsw_ef_construction"])
        )
    elif row["index_kind"] == _IVFFLAT:
        collection.ivfflat.CopyFrom(vector_pb2.IvfflatIndex(lists=row["ivfflat_lists"]))
    else:
        collection.none.SetInParent()
    return collection

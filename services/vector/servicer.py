"""``strata.vector.v1.VectorService``: pgvector collections and top-k search per tenant.

Each RPC checks its request (:mod:`services.vector.checks`), runs its
statements in one tenant transaction of :class:`VectorStore`, and maps the
rows it gets back to messages.
"""

from __future__ import annotations

from strata.vector.v1 import vector_pb2

from services.vector.checks import (
    MAX_BATCH,
    MAX_PAYLOAD,
    MAX_SEARCHES,
    check_answer_size,
    check_id,
    check_name,
    check_search,
    index_spec,
    least_bytes,
    limit,
    limit_of,
    raise_if,
    refuse_over,
    vector_text,
)
from services.vector.mapping import describe, point_message, scored_message
from services.vector.model import (
    NO_INDEX,
    Collection,
    CollectionRow,
    Hit,
    PointRow,
    planner,
)
from services.vector.store import VectorStore, VectorTx
from shared.api.answers import answer_budget, page_rows, too_large
from shared.api.callers import current_caller
from shared.api.documents import document_json
from shared.api.errors import FieldViolation, already_exists, not_found
from shared.api.pagetoken import PageTokens, page_size
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["VectorServicer"]


class VectorServicer:
    """Serves VectorService from a :class:`VectorStore`."""

    def __init__(self, store: VectorStore, tokens: PageTokens, max_response_bytes: int) -> None:
        """``max_response_bytes``: the largest answer sent (STRATA_MAX_MESSAGE_BYTES)."""
        self._store = store
        self._tokens = tokens
        self._max_response = max_response_bytes

    # -- collections -------------------------------------------------------

    async def CreateCollection(
        self, request: vector_pb2.CreateCollectionRequest, context: Context
    ) -> vector_pb2.CreateCollectionResponse:
        tenant = current_caller().tenant
        spec = request.collection
        errors: list[FieldViolation] = []
        check_name(spec.name, "collection.name", errors)
        if spec.metric not in (
            vector_pb2.METRIC_COSINE,
            vector_pb2.METRIC_L2,
            vector_pb2.METRIC_INNER_PRODUCT,
        ):
            errors.append(FieldViolation("collection.metric", "must be COSINE, L2 or INNER_PRODUCT"))
        index = index_spec(spec, spec.dimension, "collection", errors)
        raise_if(errors)
        async with self._store.transaction(tenant, timeout=max(deadline_timeout(context), 5.0)) as tx:
            row = await tx.insert_collection(tenant, spec.name, spec.dimension, spec.metric, index)
        if row is None:
            raise already_exists(
                "COLLECTION_ALREADY_EXISTS", f"collection {spec.name!r} exists", name=spec.name
            )
        return vector_pb2.CreateCollectionResponse(collection=describe(row, 0))

    async def GetCollection(
        self, request: vector_pb2.GetCollectionRequest, context: Context
    ) -> vector_pb2.GetCollectionResponse:
        tenant = current_caller().tenant
        async with self._store.transaction(tenant, timeout=deadline_timeout(context)) as tx:
            row = await _collection_row(tx, request.name, "name")
            count = await tx.count_points(row.collection)
        return vector_pb2.GetCollectionResponse(collection=describe(row, count))

    async def ListCollections(
        self, request: vector_pb2.ListCollectionsRequest, context: Context
    ) -> vector_pb2.ListCollectionsResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        raise_if(errors)
        query = ["vector.ListCollections", tenant]
        after = self._tokens.cursor(request.page_token, query, "")
        async with self._store.transaction(tenant, timeout=deadline_timeout(context)) as tx:
            rows = await tx.list_collections(str(after), size + 1)
        response = vector_pb2.ListCollectionsResponse(collections=[describe(r, 0) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(query, rows[size - 1].collection.name)
        return response

    async def DeleteCollection(
        self, request: vector_pb2.DeleteCollectionRequest, context: Context
    ) -> vector_pb2.DeleteCollectionResponse:
        tenant = current_caller().tenant
        self._store.forget(tenant, request.name)
        async with self._store.transaction(tenant, timeout=max(deadline_timeout(context), 5.0)) as tx:
            row = await _collection_row(tx, request.name, "name")
            deleted = await tx.delete_collection(row.collection.id)
        return vector_pb2.DeleteCollectionResponse(points_deleted=deleted)

    async def RebuildIndex(
        self, request: vector_pb2.RebuildIndexRequest, context: Context
    ) -> vector_pb2.RebuildIndexResponse:
        tenant = current_caller().tenant
        self._store.forget(tenant, request.name)
        # Building takes a while on a large collection: not less than a minute unless the caller says so.
        async with self._store.transaction(tenant, timeout=max(deadline_timeout(context), 60.0)) as tx:
            row = await _collection_row(tx, request.name, "name")
            index = None
            if request.WhichOneof("index") is not None:
                errors: list[FieldViolation] = []
                index = index_spec(request, row.collection.dimension, "", errors)
                raise_if(errors)
            row = await tx.rebuild_index(row, index)
            count = await tx.count_points(row.collection)
        return vector_pb2.RebuildIndexResponse(collection=describe(row, count))

    # -- points ------------------------------------------------------------

    async def UpsertPoints(
        self, request: vector_pb2.UpsertPointsRequest, context: Context
    ) -> vector_pb2.UpsertPointsResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        if not 0 < len(request.points) <= MAX_BATCH:
            errors.append(FieldViolation("points", f"must hold 1 to {MAX_BATCH} points"))
        raise_if(errors)
        async with self._store.transaction(tenant, timeout=max(deadline_timeout(context), 5.0)) as tx:
            collection = (await _collection_row(tx, request.collection, "collection")).collection
            rows: list[PointRow] = []
            seen: set[str] = set()
            for i, point in enumerate(request.points):
                if check_id(point.id, f"points[{i}].id", errors) and point.id in seen:
                    errors.append(FieldViolation(f"points[{i}].id", "appears more than once"))
                seen.add(point.id)
                vector = vector_text(point.vector, collection, f"points[{i}].vector", errors)
                payload = document_json(point.payload, f"points[{i}].payload", errors, max_bytes=MAX_PAYLOAD)
                if len(point.text.encode()) > MAX_PAYLOAD or "\x00" in point.text:
                    errors.append(FieldViolation(f"points[{i}].text", "must be at most 64 KiB without NUL"))
                rows.append(PointRow(point.id, vector, payload, point.text))
                if len(errors) >= 20:
                    break
            raise_if(errors)
            upserted = await tx.upsert_points(tenant, collection, rows)
        return vector_pb2.UpsertPointsResponse(upserted=upserted)

    async def GetPoints(
        self, request: vector_pb2.GetPointsRequest, context: Context
    ) -> vector_pb2.GetPointsResponse:
        tenant = current_caller().tenant
        if not 0 < len(request.ids) <= MAX_BATCH:
            raise_if([FieldViolation("ids", f"must hold 1 to {MAX_BATCH} ids")])
        ids = list(dict.fromkeys(request.ids))
        budget = answer_budget(self._max_response)
        async with self._store.transaction(tenant, timeout=deadline_timeout(context)) as tx:
            collection = (await _collection_row(tx, request.collection, "collection")).collection
            least = least_bytes(len(ids), collection.dimension, request.with_vectors)
            refuse_over(least, self._max_response, "ids", "ask fewer ids, or leave with_vectors off")
            rows, cut = await tx.get_points(
                collection,
                ids,
                with_vectors=request.with_vectors,
                with_payload=request.with_payload,
                budget=budget,
            )
        if cut:
            raise too_large(budget, "ids", "ask fewer ids, or leave with_payload off")
        found = {row.id: row for row in rows}
        return vector_pb2.GetPointsResponse(
            points=[point_message(found[i]) for i in ids if i in found],
            missing_ids=[i for i in ids if i not in found],
        )

    async def DeletePoints(
        self, request: vector_pb2.DeletePointsRequest, context: Context
    ) -> vector_pb2.DeletePointsResponse:
        tenant = current_caller().tenant
        which = request.WhichOneof("selector")
        if which is None:
            raise_if([FieldViolation("ids", "set ids or filter")])
        if which == "ids" and not 0 < len(request.ids.ids) <= MAX_BATCH:
            raise_if([FieldViolation("ids.ids", f"must hold 1 to {MAX_BATCH} ids")])
        async with self._store.transaction(tenant, timeout=deadline_timeout(context)) as tx:
            collection = (await _collection_row(tx, request.collection, "collection")).collection
            ids = list(request.ids.ids) if which == "ids" else None
            deleted = await tx.delete_points(collection, ids, request.filter)
        return vector_pb2.DeletePointsResponse(deleted=deleted)

    async def ScrollPoints(
        self, request: vector_pb2.ScrollPointsRequest, context: Context
    ) -> vector_pb2.ScrollPointsResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        raise_if(errors)
        query = [
            "vector.ScrollPoints",
            tenant,
            request.collection,
            request.filter.SerializeToString(deterministic=True).hex(),
        ]
        after = self._tokens.cursor(request.page_token, query, "")
        budget = answer_budget(self._max_response)

        selected = request.filter if request.HasField("filter") else None

        async def page(tx: VectorTx) -> tuple[list[PointRow], bool, int]:
            collection = (await _collection_row(tx, request.collection, "collection")).collection
            least = least_bytes(size, collection.dimension, request.with_vectors)
            refuse_over(
                least, self._max_response, "page_size", "ask a smaller page, or leave with_vectors off"
            )
            rows, cut = await tx.scroll(
                collection,
                str(after),
                size + 1,
                selected,
                with_vectors=request.with_vectors,
                with_payload=request.with_payload,
                budget=budget,
            )
            # Counted in the page's transaction (on the same server, primary or replica).
            total = await tx.count_points(collection, selected) if request.include_total_size else 0
            return rows, cut, total

        rows, cut, total = await self._store.read(tenant, page, timeout=deadline_timeout(context))
        kept, more = page_rows(rows, cut, size, budget=budget, item="point")
        response = vector_pb2.ScrollPointsResponse(points=[point_message(r) for r in kept], total_size=total)
        if more:
            response.next_page_token = self._tokens.encode(query, kept[-1].id)
        return response

    # -- search ------------------------------------------------------------

    async def Search(self, request: vector_pb2.SearchRequest, context: Context) -> vector_pb2.SearchResponse:
        tenant = current_caller().tenant
        check_search(request, "")
        check_answer_size([request], "", self._max_response)
        known = self._store.known(tenant, request.collection)
        if known is not None and len(request.vector.values) != known.dimension:
            known = None  # perhaps the collection was made again with another dimension: look it up
        budget = answer_budget(self._max_response)

        async def search(tx: VectorTx) -> vector_pb2.SearchResponse:
            return await self._search(tx, tenant, request, "", budget, planned=known)

        settings = _plan_settings(known, request) if known is not None else None
        return await self._store.read(tenant, search, timeout=deadline_timeout(context), settings=settings)

    async def SearchBatch(
        self, request: vector_pb2.SearchBatchRequest, context: Context
    ) -> vector_pb2.SearchBatchResponse:
        tenant = current_caller().tenant
        if not 0 < len(request.searches) <= MAX_SEARCHES:
            raise_if([FieldViolation("searches", f"must hold 1 to {MAX_SEARCHES} searches")])
        for i, search in enumerate(request.searches):
            check_search(search, f"searches[{i}].")
        # Refused before any work when the vectors asked for alone would pass the limit.
        check_answer_size(request.searches, "searches", self._max_response)

        async def searches(tx: VectorTx) -> list[vector_pb2.SearchResponse]:
            results: list[vector_pb2.SearchResponse] = []
            budget = answer_budget(self._max_response)
            for i, search in enumerate(request.searches):
                # Each search may take what the ones before it left of the answer.
                results.append(await self._search(tx, tenant, search, f"searches[{i}].", budget))
                budget -= results[-1].ByteSize() + 8
            return results

        results = await self._store.read(tenant, searches, timeout=deadline_timeout(context))
        return vector_pb2.SearchBatchResponse(results=results)

    async def HybridSearch(
        self, request: vector_pb2.HybridSearchRequest, context: Context
    ) -> vector_pb2.HybridSearchResponse:
        tenant = current_caller().tenant
        errors: list[FieldViolation] = []
        most = limit(request.limit, "limit", errors)
        if not request.text.strip() or len(request.text) > 1000 or "\x00" in request.text:
            errors.append(FieldViolation("text", "must be 1-1000 characters without NUL"))
        candidates = request.candidates or 4 * most
        if not most <= candidates <= 10_000:
            errors.append(FieldViolation("candidates", "must be between limit and 10000"))
        rrf_k = request.rrf_k or 60
        if not 1 <= rrf_k <= 10_000:
            errors.append(FieldViolation("rrf_k", "must be between 1 and 10000"))
        raise_if(errors)
        budget = answer_budget(self._max_response)

        async def fused(tx: VectorTx) -> tuple[list[Hit], bool]:
            collection = (await _collection_row(tx, request.collection, "collection")).collection
            vector = vector_text(request.vector, collection, "vector", errors)
            raise_if(errors)
            matching = request.filter if request.HasField("filter") else None
            return await tx.hybrid(
                collection,
                vector,
                request.text,
                most,
                candidates,
                rrf_k,
                matching,
                with_payload=request.with_payload,
                budget=budget,
            )

        hits, cut = await self._store.read(tenant, fused, timeout=deadline_timeout(context))
        if cut:
            raise too_large(budget, "limit", "ask fewer results or leave with_payload off")
        return vector_pb2.HybridSearchResponse(
            hits=[scored_message(hit, hit.fused_score, with_vectors=False) for hit in hits]
        )

    async def _search(
        self,
        tx: VectorTx,
        tenant: str,
        request: vector_pb2.SearchRequest,
        prefix: str,
        budget: int,
        planned: Collection | None = None,
    ) -> vector_pb2.SearchResponse:
        """One checked search in ``tx``, whose hits may take ``budget`` bytes
        (RESOURCE_EXHAUSTED ``RESPONSE_TOO_LARGE`` past them, before their payloads are sent).

        ``planned``: the collection as remembered, whose plan settings the
        transaction already carries. The query itself confirms it still
        exists unchanged (same id and index kind); when it returns nothing,
        the collection is looked up again and, if it changed, searched again.
        """
        collection = planned
        if collection is None:
            collection = await self._remembered(tx, tenant, request.collection, prefix)
            await tx.plan(_plan_settings(collection, request))
        hits, past = await self._nearest(tx, request, collection, prefix, budget)
        if not hits and past is None and planned is not None:
            current = await self._remembered(tx, tenant, request.collection, prefix)
            if current != planned:
                await tx.plan(_plan_settings(current, request))
                collection = current
                hits, past = await self._nearest(tx, request, collection, prefix, budget)

        def wanted(hit: Hit) -> bool:
            score = collection.score(hit.distance)
            return not request.HasField("score_threshold") or score >= request.score_threshold

        # Hits come nearest first and a score falls with the distance: a point past the budget
        # that misses the threshold means every later one does too, and the answer is whole.
        if past is not None and wanted(past):
            raise too_large(
                budget,
                f"{prefix}limit" if prefix else "limit",
                "ask fewer results or leave with_payload off",
            )
        return vector_pb2.SearchResponse(
            hits=[
                scored_message(hit, collection.score(hit.distance), with_vectors=request.with_vectors)
                for hit in hits
                if wanted(hit)
            ]
        )

    async def _nearest(
        self,
        tx: VectorTx,
        request: vector_pb2.SearchRequest,
        collection: Collection,
        prefix: str,
        budget: int,
    ) -> tuple[list[Hit], Hit | None]:
        errors: list[FieldViolation] = []
        vector = vector_text(request.vector, collection, f"{prefix}vector", errors)
        raise_if(errors)
        return await tx.nearest(
            collection,
            vector,
            limit_of(request.limit),
            request.filter if request.HasField("filter") else None,
            exact=request.exact,
            with_vectors=request.with_vectors,
            with_payload=request.with_payload,
            budget=budget,
            filter_field=f"{prefix}filter",
        )

    async def _remembered(self, tx: VectorTx, tenant: str, name: str, prefix: str) -> Collection:
        """Look ``name`` up and remember it for the next search (or forget it if gone)."""
        self._store.forget(tenant, name)
        collection = (await _collection_row(tx, name, f"{prefix}collection")).collection
        self._store.remember(tenant, collection)
        return collection


async def _collection_row(tx: VectorTx, name: str, field: str) -> CollectionRow:
    """The collection named ``name`` (checked as the request's ``field``); NOT_FOUND when absent."""
    errors: list[FieldViolation] = []
    check_name(name, field, errors)
    raise_if(errors)
    row = await tx.collection_row(name)
    if row is None:
        raise not_found("COLLECTION_NOT_FOUND", f"collection {name!r} not found", name=name)
    return row


def _plan_settings(collection: Collection, request: vector_pb2.SearchRequest) -> dict[str, str]:
    """The transaction settings for a search of ``collection`` (see :func:`planner`)."""
    exact = request.exact or collection.index_kind == NO_INDEX
    return planner(exact, request.ef_search or max(100, limit_of(request.limit)), request.probes or 10)

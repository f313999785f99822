"""All of vector's SQL: collections, points and nearest-neighbour reads, as typed rows.

Every statement runs in a tenant transaction (:meth:`VectorStore.transaction`,
:meth:`VectorStore.read`), so row-level security keeps tenants apart; the
statements of one RPC share one transaction through a :class:`VectorTx`.
Distances use the collection's operator on ``embedding::vector(<dimension>)``,
the expression its partial index is built on, so the planner can use the index.
Reads that may return large payloads are cut by bytes in Postgres
(:mod:`shared.api.answers`): each returns the rows that fit and whether one did not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
from strata.common.v1 import filter_pb2

from services.vector.model import (
    NO_INDEX,
    Collection,
    CollectionRow,
    Hit,
    IndexSpec,
    PointRow,
    planner,
)
from shared.api.answers import ROW_OVERHEAD_BYTES, cut_by_bytes, split_at_budget
from shared.storage.db import Database
from shared.storage.filters import SqlParams, compile_filter

__all__ = ["VectorStore", "VectorTx"]

T = TypeVar("T")
_KNOWN_COLLECTIONS = 10_000  # remembered (tenant, name) -> collection entries per process
_COLLECTION_COLUMNS = (
    "id, name, dimension, metric, index_kind, hnsw_m, hnsw_ef_construction, ivfflat_lists, created_at"
)


class VectorTx:
    """The statements of one RPC, in one tenant transaction (see :meth:`VectorStore.transaction`)."""

    def __init__(self, conn: asyncpg.Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout

    # -- collections -------------------------------------------------------

    async def collection_row(self, name: str) -> CollectionRow | None:
        row = await self._conn.fetchrow(
            f"SELECT {_COLLECTION_COLUMNS} FROM vector.collections WHERE name = $1",
            name,
            timeout=self._timeout,
        )
        return None if row is None else _collection_row(row)

    async def insert_collection(
        self, tenant: str, name: str, dimension: int, metric: int, index: IndexSpec
    ) -> CollectionRow | None:
        """The new collection, its index built; None when the tenant has one of that name."""
        row = await self._conn.fetchrow(
            "INSERT INTO vector.collections "
            "(tenant, name, dimension, metric, index_kind, hnsw_m, hnsw_ef_construction, ivfflat_lists) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING {_COLLECTION_COLUMNS}",
            tenant,
            name,
            dimension,
            metric,
            index.kind,
            index.m,
            index.ef_construction,
            index.lists,
            timeout=self._timeout,
        )
        if row is None:
            return None
        await self._conn.execute("SELECT vector.build_index($1)", row["id"], timeout=self._timeout)
        return _collection_row(row)

    async def list_collections(self, after: str, limit: int) -> list[CollectionRow]:
        """Up to ``limit`` collections named after ``after``, by name."""
        rows = await self._conn.fetch(
            f"SELECT {_COLLECTION_COLUMNS} FROM vector.collections WHERE name > $1 ORDER BY name LIMIT $2",
            after,
            limit,
            timeout=self._timeout,
        )
        return [_collection_row(r) for r in rows]

    async def delete_collection(self, collection_id: int) -> int:
        """Drop the collection, its index and its points; how many points there were."""
        # DROP INDEX first: it takes the table's exclusive lock before this
        # transaction holds any other lock on vector.points, so concurrent
        # deletes queue instead of deadlocking.
        await self._conn.execute("SELECT vector.drop_index($1)", collection_id, timeout=self._timeout)
        status = await self._conn.execute(
            "DELETE FROM vector.points WHERE collection_id = $1", collection_id, timeout=self._timeout
        )
        await self._conn.execute(
            "DELETE FROM vector.collections WHERE id = $1", collection_id, timeout=self._timeout
        )
        return _count(status)

    async def rebuild_index(self, row: CollectionRow, index: IndexSpec | None) -> CollectionRow:
        """Build the collection's index again, as ``index`` (None: as it is); the row as it is now."""
        collection_id = row.collection.id
        if index is not None:
            updated = await self._conn.fetchrow(
                "UPDATE vector.collections SET index_kind = $2, hnsw_m = $3, "
                "hnsw_ef_construction = $4, ivfflat_lists = $5 "
                f"WHERE id = $1 RETURNING {_COLLECTION_COLUMNS}",
                collection_id,
                index.kind,
                index.m,
                index.ef_construction,
                index.lists,
                timeout=self._timeout,
            )
            row = _collection_row(updated)
        await self._conn.execute("SELECT vector.rebuild_index($1)", collection_id, timeout=self._timeout)
        return row

    # -- points ------------------------------------------------------------

    async def upsert_points(self, tenant: str, collection: Collection, points: Sequence[PointRow]) -> int:
        """Insert or replace ``points`` (vectors and payloads as text); how many."""
        # COPY into a staging table, then one INSERT … ON CONFLICT: the fast path for batches.
        await self._conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS upsert_points "
            "(id text, embedding text, payload text, text text) ON COMMIT DELETE ROWS",
            timeout=self._timeout,
        )
        await self._conn.copy_records_to_table("upsert_points", records=points, timeout=self._timeout)
        status = await self._conn.execute(
            f"INSERT INTO vector.points (collection_id, tenant, id, embedding, payload, text) "
            f"SELECT $1, $2, id, embedding::vector({collection.dimension}), payload::jsonb, text "
            f"FROM upsert_points "
            f"ON CONFLICT (collection_id, id) DO UPDATE SET "
            f"embedding = excluded.embedding, payload = excluded.payload, text = excluded.text",
            collection.id,
            tenant,
            timeout=self._timeout,
        )
        return _count(status)

    async def get_points(
        self,
        collection: Collection,
        ids: Sequence[str],
        *,
        with_vectors: bool,
        with_payload: bool,
        budget: int,
    ) -> tuple[list[PointRow], bool]:
        """The points of ``ids`` that exist, and whether they were cut at ``budget`` bytes."""
        columns = _point_columns(with_vectors, with_payload, collection.dimension)
        counted = _counted(with_payload, budget)
        read = f"SELECT {columns} FROM vector.points WHERE collection_id = $1 AND id = ANY($2::text[])"
        args: list[object] = [collection.id, list(ids)]
        if counted is not None:
            args.append(counted)
        rows = await self._conn.fetch(
            cut_by_bytes(read, "id", "$3" if counted is not None else None), *args, timeout=self._timeout
        )
        fit, past = split_at_budget(rows, counted)
        return [_point_row(r) for r in fit], past is not None

    async def delete_points(
        self, collection: Collection, ids: Sequence[str] | None, matching: filter_pb2.Filter | None
    ) -> int:
        """Delete the points of ``ids``, or else those ``matching``; how many."""
        params = SqlParams()
        collection_id = params.add(collection.id)
        if ids is not None:
            condition = f"id = ANY({params.add(list(ids))}::text[])"
        else:
            condition = compile_filter(matching, "payload", params)
        status = await self._conn.execute(
            f"DELETE FROM vector.points WHERE collection_id = {collection_id} AND {condition}",
            *params.values,
            timeout=self._timeout,
        )
        return _count(status)

    async def count_points(self, collection: Collection, matching: filter_pb2.Filter | None = None) -> int:
        params = SqlParams()
        collection_id = params.add(collection.id)
        where = compile_filter(matching, "payload", params)
        count = await self._conn.fetchval(
            f"SELECT count(*) FROM vector.points WHERE collection_id = {collection_id} AND {where}",
            *params.values,
            timeout=self._timeout,
        )
        return int(count)

    async def scroll(
        self,
        collection: Collection,
        after: str,
        limit: int,
        matching: filter_pb2.Filter | None,
        *,
        with_vectors: bool,
        with_payload: bool,
        budget: int,
    ) -> tuple[list[PointRow], bool]:
        """Up to ``limit`` points with ids after ``after``, by id, and whether they were cut at ``budget``."""
        params = SqlParams()
        collection_id = params.add(collection.id)
        where = compile_filter(matching, "payload", params)
        scrolled = (
            f"SELECT {_point_columns(with_vectors, with_payload, collection.dimension)} FROM vector.points "
            f"WHERE collection_id = {collection_id} AND id > {params.add(after)} AND {where} "
            f"ORDER BY id LIMIT {params.add(limit)}"
        )
        counted = _counted(with_payload, budget)
        rows = await self._conn.fetch(
            cut_by_bytes(scrolled, "id", _param(params, counted)), *params.values, timeout=self._timeout
        )
        fit, past = split_at_budget(rows, counted)
        return [_point_row(r) for r in fit], past is not None

    # -- nearest neighbours -------------------------------------------------

    async def plan(self, settings: Mapping[str, str]) -> None:
        """Apply :func:`planner`'s ``settings`` to the rest of this transaction."""
        names = list(settings)
        await self._conn.execute(
            "SELECT " + ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(names))),
            *[part for name in names for part in (name, settings[name])],
            timeout=self._timeout,
        )

    async def nearest(
        self,
        collection: Collection,
        vector: str,
        limit: int,
        matching: filter_pb2.Filter | None,
        *,
        exact: bool,
        with_vectors: bool,
        with_payload: bool,
        budget: int,
        filter_field: str = "filter",
    ) -> tuple[list[Hit], Hit | None]:
        """The ``limit`` points nearest ``vector`` (pgvector text), nearest first, cut where they would
        pass ``budget`` bytes; and the first hit past it (None: the answer is whole).

        Nothing comes back if the collection was dropped or its index rebuilt as
        another kind since ``collection`` was read: the statement checks it once.
        """
        params = SqlParams()
        collection_id = params.add(collection.id)
        where = compile_filter(matching, "payload", params, field=filter_field)
        distance = collection.distance(params.add(vector))
        # "+ 0" hides the distance from the planner's index matching: an exact
        # search scans the collection's rows (through the primary key) and sorts them.
        order = f"{distance} + 0" if exact or collection.index_kind == NO_INDEX else distance
        columns = _point_columns(with_vectors, with_payload, collection.dimension)
        counted = _counted(with_payload, budget)
        # The EXISTS is evaluated once (an init plan): nothing is returned if the
        # collection was dropped or its index rebuilt as another kind meanwhile.
        # relaxed_order iterative scans may return near-ties out of order: sort the few hits again.
        rows = await self._conn.fetch(
            f"WITH hits AS MATERIALIZED ("
            f"SELECT {columns}, {distance} AS distance FROM vector.points "
            f"WHERE collection_id = {collection_id} AND {where} "
            f"AND EXISTS (SELECT FROM vector.collections WHERE id = {collection_id} "
            f"AND index_kind = {params.add(collection.index_kind)}) "
            f"ORDER BY {order} LIMIT {params.add(limit)}"
            f") {cut_by_bytes('SELECT * FROM hits', 'distance, id', _param(params, counted))}",
            *params.values,
            timeout=self._timeout,
        )
        fit, past = split_at_budget(rows, counted)
        return [_hit(r) for r in fit], None if past is None else _hit(past)

    async def hybrid(
        self,
        collection: Collection,
        vector: str,
        text: str,
        limit: int,
        candidates: int,
        rrf_k: int,
        matching: filter_pb2.Filter | None,
        *,
        with_payload: bool,
        budget: int,
    ) -> tuple[list[Hit], bool]:
        """Vector similarity fused with full-text match by reciprocal rank fusion, best first;
        and whether the hits were cut at ``budget`` bytes."""
        params = SqlParams()
        collection_id = params.add(collection.id)
        where = compile_filter(matching, "payload", params)
        distance = collection.distance(params.add(vector))
        query = params.add(text)
        columns = _point_columns(False, with_payload, collection.dimension, "p.")
        counted = _counted(with_payload, budget)
        answer = (
            f"SELECT {columns}, f.score AS fused_score, coalesce(f.distance, 0) AS distance FROM fused f "
            f"JOIN vector.points p ON p.collection_id = {collection_id} AND p.id = f.id "
            f"ORDER BY f.score DESC, f.id LIMIT {params.add(limit)}"
        )
        await self.plan(planner(collection.index_kind == NO_INDEX, max(candidates, 100), 10))
        rows = await self._conn.fetch(
            f"""
            WITH by_vector AS MATERIALIZED (
                SELECT id, {distance} AS distance FROM vector.points
                WHERE collection_id = {collection_id} AND {where}
                ORDER BY {distance} LIMIT {params.add(candidates)}
            ), by_text AS MATERIALIZED (
                SELECT id FROM vector.points
                WHERE collection_id = {collection_id} AND {where}
                  AND tsv @@ plainto_tsquery('simple', {query})
                ORDER BY ts_rank(tsv, plainto_tsquery('simple', {query})) DESC, id
                LIMIT {params.add(candidates)}
            ), ranked AS (
                SELECT id, row_number() OVER (ORDER BY distance, id) AS rank, distance FROM by_vector
                UNION ALL
                SELECT id, row_number() OVER (), NULL FROM by_text
            ), fused AS (
                SELECT id, sum(1.0 / ({params.add(rrf_k)} + rank)) AS score, min(distance) AS distance
                FROM ranked GROUP BY id
            )
            {cut_by_bytes(answer, "fused_score DESC, id", _param(params, counted))}
            """,
            *params.values,
            timeout=self._timeout,
        )
        fit, past = split_at_budget(rows, counted)
        return [_hit(r) for r in fit], past is not None


class VectorStore:
    """The vector schema of one database, and the collections this process has looked up lately."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # (tenant, name) -> collection, so a search need not look its collection
        # up first; every search re-checks it in its own statement (VectorTx.nearest).
        self._known: OrderedDict[tuple[str, str], Collection] = OrderedDict()

    @asynccontextmanager
    async def transaction(
        self,
        tenant: str,
        *,
        timeout: float,
        read_only: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> AsyncIterator[VectorTx]:
        """A tenant transaction on the primary, committed on clean exit."""
        async with self._db.tenant_transaction(
            tenant, timeout=timeout, read_only=read_only, settings=settings
        ) as conn:
            yield VectorTx(conn, timeout)

    async def read(
        self,
        tenant: str,
        work: Callable[[VectorTx], Awaitable[T]],
        *,
        timeout: float,
        settings: Mapping[str, str] | None = None,
    ) -> T:
        """``work`` in a read-only tenant transaction that a streaming replica may serve."""

        async def on(db: Database) -> T:
            async with db.tenant_transaction(
                tenant, timeout=timeout, read_only=True, settings=settings
            ) as conn:
                return await work(VectorTx(conn, timeout))

        return await self._db.read_replica(on)

    def known(self, tenant: str, name: str) -> Collection | None:
        """The collection as last looked up here, if it was."""
        return self._known.get((tenant, name))

    def forget(self, tenant: str, name: str) -> None:
        self._known.pop((tenant, name), None)

    def remember(self, tenant: str, collection: Collection) -> None:
        """Keep ``collection`` for the next search (the oldest of too many is dropped)."""
        key = (tenant, collection.name)
        self._known.pop(key, None)
        self._known[key] = collection
        if len(self._known) > _KNOWN_COLLECTIONS:
            self._known.popitem(last=False)


def _collection_row(row: asyncpg.Record) -> CollectionRow:
    return CollectionRow(
        Collection(row["id"], row["name"], row["dimension"], row["metric"], row["index_kind"]),
        IndexSpec(row["index_kind"], row["hnsw_m"], row["hnsw_ef_construction"], row["ivfflat_lists"]),
        row["created_at"],
    )


def _point_columns(with_vectors: bool, with_payload: bool, dimension: int, table: str = "") -> str:
    """The columns a point read selects, and ``answer_bytes``: what the point adds to the answer
    (:mod:`shared.api.answers`), with the payload counted as the JSON text it is sent as."""
    columns = [f"{table}id"]
    size = f"octet_length({table}id) + {ROW_OVERHEAD_BYTES}"
    columns.append(f"{table}embedding::text AS embedding" if with_vectors else "NULL::text AS embedding")
    if with_vectors:
        size += f" + {4 * dimension + 8}"
    if with_payload:
        columns += [f"{table}payload::text AS payload", f"{table}text"]
        size += f" + octet_length({table}payload::text) + octet_length({table}text)"
    else:
        columns += ["NULL::text AS payload", "NULL::text AS text"]
    return ", ".join([*columns, f"{size} AS answer_bytes"])


def _counted(with_payload: bool, budget: int) -> int | None:
    """The budget a point read is cut at: only one with payloads needs it (ids, vectors and
    scores are bounded by the request, checked before any work)."""
    return budget if with_payload else None


def _param(params: SqlParams, value: int | None) -> str | None:
    return None if value is None else params.add(value)


def _point_row(row: asyncpg.Record) -> PointRow:
    return PointRow(row["id"], row["embedding"], row["payload"], row["text"])


def _hit(row: asyncpg.Record) -> Hit:
    return Hit(_point_row(row), float(row["distance"]), float(row.get("fused_score", 0.0)))


def _count(status: str) -> int:
    """The row count of a command status ("DELETE 3", "INSERT 0 5")."""
    return int(status.split()[-1])

"""Vector scenarios: bulk load through the service vs raw COPY, search QPS and recall vs raw pgvector SQL.

Both sides get the same clustered float32 data, the same HNSW index (m 16,
ef_construction 64, cosine) and the same ef_search (100); the raw side is a
plain table in a ``bench`` schema written and searched as the service role.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass

import asyncpg
from google.protobuf import struct_pb2
from strata.common.v1 import filter_pb2
from strata.vector.v1 import vector_pb2

from bench.target import Target

__all__ = [
    "EF_SEARCH",
    "RAW_FILTERED_SEARCH",
    "RAW_SEARCH",
    "VECTOR",
    "VectorData",
    "load_raw",
    "load_service",
    "raw_queries",
    "recall_at_10",
    "search_bodies",
]

VECTOR = "/strata.vector.v1.VectorService/"
COLLECTION = "bench"
DIMENSION = 128
EF_SEARCH = 100
BUCKETS = 10  # point i has payload {"bucket": i % BUCKETS}; filtered searches ask for one bucket


@dataclass(frozen=True)
class VectorData:
    """Points (id, values) around Gaussian cluster centres, and queries drawn the same way."""

    points: list[tuple[str, list[float]]]
    queries: list[list[float]]

    @classmethod
    def clustered(cls, count: int, queries: int = 200, clusters: int = 100, seed: int = 11) -> VectorData:
        rng = random.Random(seed)
        centres = [[rng.gauss(0.0, 1.0) for _ in range(DIMENSION)] for _ in range(clusters)]

        def sample() -> list[float]:
            centre = centres[rng.randrange(clusters)]
            return [c + rng.gauss(0.0, 0.5) for c in centre]

        return cls([(f"p{i}", sample()) for i in range(count)], [sample() for _ in range(queries)])


def _bucket(point_id: str) -> int:
    return int(point_id[1:]) % BUCKETS


def _payload(point_id: str) -> struct_pb2.Struct:
    payload = struct_pb2.Struct()
    payload.update({"bucket": _bucket(point_id)})
    return payload


def _text(values: list[float]) -> str:
    return "[" + ",".join(f"{v:.6g}" for v in values) + "]"


async def load_service(target: Target, data: VectorData, lanes: int = 2) -> float:
    """Create the collection and upsert every point through the service; points per second."""
    async with target.channel("vector") as channel:
        spec = vector_pb2.Collection(name=COLLECTION, dimension=DIMENSION, metric=vector_pb2.METRIC_COSINE)
        await channel.unary_unary(VECTOR + "CreateCollection")(
            vector_pb2.CreateCollectionRequest(collection=spec).SerializeToString()
        )
        upsert = channel.unary_unary(VECTOR + "UpsertPoints")
        batches = [data.points[i : i + 1000] for i in range(0, len(data.points), 1000)]
        bodies = [
            vector_pb2.UpsertPointsRequest(
                collection=COLLECTION,
                points=[
                    vector_pb2.Point(id=pid, vector=vector_pb2.Vector(values=v), payload=_payload(pid))
                    for pid, v in batch
                ],
            ).SerializeToString()
            for batch in batches
        ]
        queue = list(bodies)
        started = time.perf_counter()

        async def lane() -> None:
            while queue:
                await upsert(queue.pop(), timeout=300)  # the channel signs each call for its body

        await asyncio.gather(*(lane() for _ in range(lanes)))
        return len(data.points) / (time.perf_counter() - started)


async def load_raw(owner_url: str, service_url: str, data: VectorData) -> float:
    """COPY every point into an equally indexed plain table as the service role; points per second."""
    owner = await asyncpg.connect(owner_url)
    try:
        await owner.execute(
            f"DROP TABLE IF EXISTS bench.points;"
            f"CREATE TABLE bench.points (id text PRIMARY KEY, embedding vector({DIMENSION}) NOT NULL, "
            "payload jsonb NOT NULL);"
            "CREATE INDEX ON bench.points USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 64);"
            "GRANT SELECT, INSERT ON bench.points TO strata_app;"
        )
    finally:
        await owner.close()
    conn = await asyncpg.connect(service_url)
    try:
        started = time.perf_counter()
        for start in range(0, len(data.points), 1000):
            rows = "".join(
                f'{pid}\t{_text(v)}\t{{"bucket": {_bucket(pid)}}}\n'
                for pid, v in data.points[start : start + 1000]
            )
            await conn.copy_to_table(
                "points",
                schema_name="bench",
                source=io.BytesIO(rows.encode()),
                columns=["id", "embedding", "payload"],
            )
        return len(data.points) / (time.perf_counter() - started)
    finally:
        await conn.close()


def search_bodies(data: VectorData, filtered: bool = False) -> list[bytes]:
    """Search requests (top 10, default settings) for every query; ``filtered``: in one bucket each."""
    bodies = []
    for i, q in enumerate(data.queries):
        request = vector_pb2.SearchRequest(
            collection=COLLECTION, vector=vector_pb2.Vector(values=q), limit=10
        )
        if filtered:
            request.filter.condition.path = "bucket"
            request.filter.condition.op = filter_pb2.OPERATOR_EQ
            request.filter.condition.value.number_value = i % BUCKETS
        bodies.append(request.SerializeToString())
    return bodies


def raw_queries(data: VectorData, filtered: bool = False) -> list[str] | list[list[str]]:
    """The queries' arguments for :data:`RAW_SEARCH` (pgvector text), or :data:`RAW_FILTERED_SEARCH`."""
    if filtered:
        return [[_text(q), str(i % BUCKETS)] for i, q in enumerate(data.queries)]
    return [_text(q) for q in data.queries]


RAW_SEARCH = f"SELECT id FROM bench.points ORDER BY embedding <=> $1::vector({DIMENSION}) LIMIT 10"
# The predicate the service compiles an OPERATOR_EQ condition to; iterative scans as the service sets them.
RAW_FILTERED_SEARCH = (
    "SELECT id FROM bench.points WHERE (payload #> '{bucket}') = $2::jsonb "
    f"ORDER BY embedding <=> $1::vector({DIMENSION}) LIMIT 10"
)


async def recall_at_10(target: Target, data: VectorData, queries: int = 50) -> float:
    """Mean recall@10 of default searches against exact ones, through the service."""
    found = 0
    async with target.channel("vector") as channel:
        search = channel.unary_unary(
            VECTOR + "Search",
            request_serializer=vector_pb2.SearchRequest.SerializeToString,
            response_deserializer=vector_pb2.SearchResponse.FromString,
        )
        for query in data.queries[:queries]:
            vector = vector_pb2.Vector(values=query)
            approximate = await search(
                vector_pb2.SearchRequest(collection=COLLECTION, vector=vector, limit=10)
            )
            exact = await search(
                vector_pb2.SearchRequest(collection=COLLECTION, vector=vector, limit=10, exact=True)
            )
            found += len({h.id for h in approximate.hits} & {h.id for h in exact.hits})
    return found / (10 * min(queries, len(data.queries)))

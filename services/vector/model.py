"""What vector's store reads and writes: collections, index specs, points and hits, as typed values."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import NamedTuple

from strata.vector.v1 import vector_pb2

__all__ = [
    "HNSW",
    "IVFFLAT",
    "NO_INDEX",
    "Collection",
    "CollectionRow",
    "Hit",
    "IndexSpec",
    "PointRow",
    "planner",
]

NO_INDEX, HNSW, IVFFLAT = 0, 1, 2
_OPERATOR: dict[int, str] = {
    vector_pb2.METRIC_COSINE: "<=>",
    vector_pb2.METRIC_L2: "<->",
    vector_pb2.METRIC_INNER_PRODUCT: "<#>",
}


@dataclass(frozen=True, slots=True)
class Collection:
    """What a search needs of a collection."""

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
        """Higher-is-closer score from a pgvector distance (it falls as the distance grows)."""
        if self.metric == vector_pb2.METRIC_COSINE:
            return 1.0 - distance
        return -distance  # L2: negative distance; inner product: <#> is the negative dot product


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A collection's index: its kind and that kind's parameters."""

    kind: int
    m: int
    ef_construction: int
    lists: int


@dataclass(frozen=True, slots=True)
class CollectionRow:
    """A row of vector.collections."""

    collection: Collection
    index: IndexSpec
    created_at: datetime.datetime


class PointRow(NamedTuple):
    """A point as read: the vector as pgvector text and the payload as JSON text, when asked for."""

    id: str
    embedding: str | None
    payload: str | None
    text: str | None


class Hit(NamedTuple):
    """A point found near a query, with its distance (and, for hybrid search, its fused score)."""

    point: PointRow
    distance: float
    fused_score: float


def planner(exact: bool, ef_search: int, probes: int) -> dict[str, str]:
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

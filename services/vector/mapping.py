"""Vector's rows as messages: points, scored hits, collections."""

from __future__ import annotations

import json

from strata.vector.v1 import vector_pb2

from services.vector.model import HNSW, IVFFLAT, CollectionRow, Hit, PointRow
from shared.api.timestamps import to_timestamp

__all__ = ["describe", "point_message", "scored_message"]


def _vector(text: str) -> vector_pb2.Vector:
    return vector_pb2.Vector(values=[float(v) for v in text.strip("[]").split(",")] if text != "[]" else [])


def point_message(row: PointRow) -> vector_pb2.Point:
    """A point as read (vector, payload and text when they were asked for, so selected)."""
    point = vector_pb2.Point(id=row.id)
    if row.embedding is not None:
        point.vector.CopyFrom(_vector(row.embedding))
    if row.payload is not None:
        point.payload.update(json.loads(row.payload))
        point.text = row.text or ""
    return point


def scored_message(hit: Hit, score: float, *, with_vectors: bool) -> vector_pb2.ScoredPoint:
    point = point_message(hit.point)
    scored = vector_pb2.ScoredPoint(id=point.id, score=score, distance=hit.distance, text=point.text)
    if with_vectors:
        scored.vector.CopyFrom(point.vector)
    if hit.point.payload is not None:
        scored.payload.CopyFrom(point.payload)
    return scored


def describe(row: CollectionRow, point_count: int) -> vector_pb2.Collection:
    collection = vector_pb2.Collection(
        name=row.collection.name,
        dimension=row.collection.dimension,
        metric=vector_pb2.Metric.Name(row.collection.metric),
        create_time=to_timestamp(row.created_at),
        point_count=point_count,
    )
    if row.index.kind == HNSW:
        collection.hnsw.CopyFrom(
            vector_pb2.HnswIndex(m=row.index.m, ef_construction=row.index.ef_construction)
        )
    elif row.index.kind == IVFFLAT:
        collection.ivfflat.CopyFrom(vector_pb2.IvfflatIndex(lists=row.index.lists))
    else:
        collection.none.SetInParent()
    return collection

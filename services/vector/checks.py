"""What VectorService checks of a request: names, vectors, index parameters, limits, answer sizes.

Each check notes :class:`FieldViolation` s naming the request's fields; a
vector is checked against its collection (dimension, metric) once the
collection is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from strata.vector.v1 import vector_pb2

from services.vector.model import HNSW, IVFFLAT, NO_INDEX, Collection, IndexSpec
from shared.api.errors import FieldViolation, invalid_argument, raise_invalid

__all__ = [
    "MAX_BATCH",
    "MAX_PAYLOAD",
    "MAX_SEARCHES",
    "check_answer_size",
    "check_id",
    "check_name",
    "check_search",
    "index_spec",
    "least_bytes",
    "limit",
    "limit_of",
    "raise_if",
    "refuse_over",
    "vector_text",
]

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_BATCH = 1000
MAX_SEARCHES = 100
MAX_PAYLOAD = 64 * 1024
_MAX_INDEXED_DIMENSION = 2000
# What a hit costs beyond its vector: id, score, distance, framing (payloads come on top).
_HIT_OVERHEAD_BYTES = 32


def raise_if(errors: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT with ``errors``, if there are any."""
    raise_invalid(errors)


def check_name(name: str, field: str, errors: list[FieldViolation]) -> None:
    if not NAME_RE.fullmatch(name):
        errors.append(FieldViolation(field, "must be 1-64 characters of [A-Za-z0-9_-]"))


def check_id(point_id: str, field: str, errors: list[FieldViolation]) -> bool:
    """Whether ``point_id`` is a valid point id (if not, a violation is noted)."""
    if _ID_RE.fullmatch(point_id):
        return True
    errors.append(FieldViolation(field, "must be 1-128 characters of [A-Za-z0-9_.:-]"))
    return False


def vector_text(
    vector: vector_pb2.Vector, collection: Collection, field: str, errors: list[FieldViolation]
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


def index_spec(
    message: vector_pb2.Collection | vector_pb2.RebuildIndexRequest,
    dimension: int,
    prefix: str,
    errors: list[FieldViolation],
) -> IndexSpec:
    """The index asked for by ``message``'s ``index`` oneof (unset: HNSW), checked against ``dimension``.

    Violations name fields under ``prefix`` ("collection" at creation, "" for a rebuild).
    """
    field = f"{prefix}." if prefix else ""
    chosen = message.WhichOneof("index") or "hnsw"
    kind = {"hnsw": HNSW, "ivfflat": IVFFLAT, "none": NO_INDEX}[chosen]
    most = _MAX_INDEXED_DIMENSION if kind != NO_INDEX else 16000
    if not 1 <= dimension <= most:
        # At creation the dimension is the caller's to change; on a rebuild, the index.
        where = f"{field}dimension" if prefix else chosen
        errors.append(FieldViolation(where, f"dimension must be between 1 and {most} for this index"))
    spec = IndexSpec(
        kind, message.hnsw.m or 16, message.hnsw.ef_construction or 64, message.ivfflat.lists or 100
    )
    if kind == HNSW and not (
        2 <= spec.m <= 100 and 4 <= spec.ef_construction <= 1000 and spec.ef_construction >= 2 * spec.m
    ):
        errors.append(FieldViolation(f"{field}hnsw", "m must be 2-100, ef_construction 4-1000 and >= 2*m"))
    if kind == IVFFLAT and not 1 <= spec.lists <= 32768:
        errors.append(FieldViolation(f"{field}ivfflat.lists", "must be between 1 and 32768"))
    return spec


def limit(value: int, field: str, errors: list[FieldViolation]) -> int:
    """A search's ``limit``: 0 means 10, at most 1000."""
    if not 0 <= value <= 1000:
        errors.append(FieldViolation(field, "must be between 0 and 1000"))
    return limit_of(value)


def limit_of(value: int) -> int:
    return value or 10


def check_search(request: vector_pb2.SearchRequest, prefix: str) -> None:
    """A search's own fields (the collection and vector are checked against the collection later)."""
    errors: list[FieldViolation] = []
    limit(request.limit, f"{prefix}limit", errors)
    if not 0 <= request.ef_search <= 1000:
        errors.append(FieldViolation(f"{prefix}ef_search", "must be between 0 and 1000"))
    if not 0 <= request.probes <= 32768:
        errors.append(FieldViolation(f"{prefix}probes", "must be between 0 and 32768"))
    if request.HasField("score_threshold") and not math.isfinite(request.score_threshold):
        errors.append(FieldViolation(f"{prefix}score_threshold", "must be a finite number"))
    raise_if(errors)


def check_answer_size(searches: Iterable[vector_pb2.SearchRequest], field: str, budget: int) -> None:
    """INVALID_ARGUMENT when the vectors ``searches`` ask for could not fit in one answer.

    A hit's vector has the query vector's dimension, so ``limit`` hits of it
    take at least limit x (4 x dimension) bytes: known before any work, unlike
    payloads, which the search counts as it goes.
    """
    least = sum(least_bytes(limit_of(s.limit), len(s.vector.values), s.with_vectors) for s in searches)
    refuse_over(
        least, budget, field or "limit", "ask fewer results, fewer searches, or leave with_vectors off"
    )


def least_bytes(points: int, dimension: int, with_vectors: bool) -> int:
    """The fewest bytes ``points`` points (or hits) of ``dimension`` take in an answer."""
    return points * (_HIT_OVERHEAD_BYTES + (4 * dimension + 8 if with_vectors else 0))


def refuse_over(least: int, budget: int, field: str, remedy: str) -> None:
    """INVALID_ARGUMENT on ``field`` when an answer of at least ``least`` bytes cannot fit ``budget``."""
    if least > budget:
        raise invalid_argument(
            [
                FieldViolation(
                    field,
                    f"the answer would hold at least {least} bytes (with vectors: 4 bytes a dimension), "
                    f"over the {budget}-byte message limit: {remedy}",
                )
            ],
        )

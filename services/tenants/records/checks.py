"""What RecordService checks of a request: names, etags, update masks, the order asked for.

Each check notes :class:`FieldViolation` s naming the request's fields; an
update mask is then applied to the stored document by :func:`apply_mask`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from strata.tenants.v1 import tenants_pb2

from services.tenants.names import COLLECTION_RE
from shared.api.errors import FieldViolation, raise_invalid
from shared.storage.filters import validate_path

__all__ = [
    "ID_RE",
    "MAX_BATCH",
    "MAX_DATA",
    "OrderBy",
    "apply_mask",
    "check_collection",
    "check_id",
    "mask_paths",
    "order_by",
    "raise_if",
    "version_of",
]

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_DATA = 1024 * 1024
MAX_BATCH = 1000
# An etag this API issues (see mapping.record_etag); before per-incarnation etags it was r<revision>.
_ETAG_RE = re.compile(r"r(\d{1,18})(?:-(\d{1,18}))?")
# Matches no row: cache_version comes from a sequence that starts at 1.
_NEVER_CURRENT = 0
_ABSENT = object()  # a masked path missing from the update (a JSON null is a value)


@dataclass(frozen=True, slots=True)
class OrderBy:
    """A ListRecords order: ``kind`` "time" (``field`` create_time or update_time), "id", or "json"
    (``field`` the document path)."""

    kind: str
    field: str
    descending: bool


def raise_if(errors: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT with ``errors``, if there are any."""
    raise_invalid(errors)


def check_collection(value: str, field: str, errors: list[FieldViolation]) -> None:
    if not COLLECTION_RE.fullmatch(value):
        errors.append(FieldViolation(field, "must be 1-64 characters of [A-Za-z0-9_-]"))


def check_id(value: str, field: str, errors: list[FieldViolation]) -> None:
    if not ID_RE.fullmatch(value):
        errors.append(FieldViolation(field, "must be 1-128 characters of [A-Za-z0-9_.:-]"))


def version_of(etag: str, field: str, errors: list[FieldViolation]) -> int | None:
    """The cache_version ``etag`` (the request's ``field``) names; None without an etag (or when it
    is not one of ours)."""
    if not etag:
        return None
    match = _ETAG_RE.fullmatch(etag)
    if match is None:
        errors.append(FieldViolation(field, "is not an etag of this API"))
        return None
    # An etag of the old form (no version) was issued before this one: it names
    # no incarnation, so it is stale (ABORTED), not malformed.
    return int(match[2]) if match[2] else _NEVER_CURRENT


def order_by(text: str, errors: list[FieldViolation]) -> OrderBy:
    """The order ``text`` asks for, as AIP-132 writes it: a field ("create_time", the default;
    "update_time", "id" or "data.<path>"), then " desc" for descending (" asc" may be written)."""
    value, _, direction = text.strip().partition(" ")
    direction = direction.strip().lower()
    if direction not in ("", "asc", "desc"):
        errors.append(FieldViolation("order_by", 'must be a field, then optionally " asc" or " desc"'))
    descending = direction == "desc"
    if value in ("", "create_time", "update_time"):
        return OrderBy("time", value or "create_time", descending)
    if value == "id":
        return OrderBy("id", "", descending)
    if value.startswith("data."):
        if validate_path(value.removeprefix("data."), "order_by", errors):
            return OrderBy("json", value.removeprefix("data."), descending)
        return OrderBy("id", "", descending)
    errors.append(FieldViolation("order_by", 'must be "create_time", "update_time", "id" or "data.<path>"'))
    return OrderBy("id", "", descending)


def mask_paths(
    request: tenants_pb2.UpdateRecordRequest, errors: list[FieldViolation]
) -> list[list[str]] | None:
    """The data paths to change (as key lists), or None for a full replace. Without a mask, what the
    record sets (AIP-134's implied mask): its data whole, when present."""
    paths = list(request.update_mask.paths)
    if not paths and not request.record.HasField("data"):
        errors.append(FieldViolation("update_mask", 'names no path and the record sets no data; "data"'))
        return None
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


def apply_mask(current: dict[str, Any], incoming: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
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

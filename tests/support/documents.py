"""Building the messages tests send: JSON documents as Structs, and filters.

Filters come as messages (``cond``, ``all_of``, ``any_of``, ``none_of``) or
in their JSON form, as grpcurl sends them: :func:`make` reads a JSON form, in
which messages may stand for nodes, into a ``Filter``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from strata.common.v1 import filter_pb2

__all__ = ["all_of", "any_of", "cond", "make", "none_of", "null_cond", "struct"]


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a ``google.protobuf.Struct``."""
    data = struct_pb2.Struct()
    data.update(value)
    return data


def cond(path: str, op: str, value: Any = None, *, values: list[Any] | None = None) -> filter_pb2.Filter:
    """A condition: ``op`` as "EQ" or "OPERATOR_EQ"; ``value`` and ``values`` as JSON."""
    condition = filter_pb2.Condition(path=path, op=filter_pb2.Operator.Value(_operator(op)))
    if value is not None:
        condition.value.CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    for item in values or ():
        condition.values.append(json_format.ParseDict(item, struct_pb2.Value()))
    return filter_pb2.Filter(condition=condition)


def null_cond(path: str, op: str) -> filter_pb2.Filter:
    """A condition whose value is JSON null (``cond`` reads None as no value)."""
    node = cond(path, op)
    node.condition.value.null_value = struct_pb2.NULL_VALUE
    return node


def all_of(*filters: filter_pb2.Filter | dict[str, Any]) -> filter_pb2.Filter:
    return filter_pb2.Filter(all_of=filter_pb2.FilterList(filters=[make(f) for f in filters]))


def any_of(*filters: filter_pb2.Filter | dict[str, Any]) -> filter_pb2.Filter:
    return filter_pb2.Filter(any_of=filter_pb2.FilterList(filters=[make(f) for f in filters]))


def none_of(*filters: filter_pb2.Filter | dict[str, Any]) -> filter_pb2.Filter:
    return filter_pb2.Filter(none_of=filter_pb2.FilterList(filters=[make(f) for f in filters]))


def make(spec: filter_pb2.Filter | dict[str, Any]) -> filter_pb2.Filter:
    """A ``Filter`` from its JSON form (nodes in it may be ``Filter`` messages), or ``spec`` itself."""
    if isinstance(spec, filter_pb2.Filter):
        return spec
    return json_format.ParseDict(_json(spec), filter_pb2.Filter())


def _json(node: Any) -> Any:
    if isinstance(node, filter_pb2.Filter):
        return json_format.MessageToDict(node, preserving_proto_field_name=True)
    if isinstance(node, dict):
        return {key: _json(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_json(item) for item in node]
    return node


def _operator(op: str) -> str:
    return op if op.startswith("OPERATOR_") else f"OPERATOR_{op}"

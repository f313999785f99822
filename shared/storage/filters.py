"""Compile a ``strata.common.v1.Filter`` into a SQL boolean over a jsonb column.

Tenant records and vector payloads are JSON documents in a jsonb column;
callers select them with a :class:`~strata.common.v1.filter_pb2.Filter`.
:func:`compile_filter` turns one into a SQL expression for a ``WHERE`` clause,
with every value as a bind parameter collected in :class:`SqlParams`:

.. code-block:: python

    params = SqlParams(start=2)  # $1 is the caller's own (the tenant id)
    where = compile_filter(request.filter, "data", params)
    rows = await conn.fetch(
        f"SELECT id FROM tenants.records WHERE tenant_id = $1 AND {where}",
        tenant_id, *params.values,
    )

The only text a request contributes to the SQL is a path, and only after
:func:`validate_path` has checked it to ``[A-Za-z0-9_-]`` segments. The path
becomes the same literal every time (``("data" #> '{address,city}')``, from
:func:`json_path_sql`), so an expression index declared on it is used::

    CREATE INDEX ON tenants.records ((data #> '{score}'));

Equality, IN and number ranges compare that jsonb expression and use such an
index; string ranges compare ``(data #>> '{path}') COLLATE "C"`` (code-point
order whatever the database's collation), which an index on that text
expression serves; CONTAINS on arrays uses ``@>``, which a GIN index on
the path expression serves. CONTAINS matches elements structurally, as
``@>`` does: ``{"k": 1}`` is found in ``[{"k": 1, "j": 2}]``, and ``["x"]``
in ``[["x", "y"]]``; scalars match exactly (``1`` also finds ``1.0``).

The expression is true for a matching document and false or NULL otherwise:
use it in ``WHERE``; to negate it, use ``(<expr>) IS NOT TRUE``, not ``NOT``.

jsonb parameters are passed as JSON text, which asyncpg's default jsonb codec
sends as is; a connection that installs its own jsonb codec would encode them
twice.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from google.protobuf import struct_pb2
from strata.common.v1 import filter_pb2

from shared.api.errors import FieldViolation, invalid_argument

__all__ = ["SqlParams", "compile_filter", "json_path_sql", "validate_path"]

MAX_DEPTH: Final = 8
"""How many Filter levels may nest (a lone top-level filter is level 1)."""
MAX_CONDITIONS: Final = 64
"""Conditions in one filter, counted over the whole tree."""
MAX_IN_VALUES: Final = 1000
"""Values in one IN list."""
MAX_PATH_SEGMENTS: Final = 16
"""Dot-separated segments in one path."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_COLUMN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Enough to say what is wrong without a reply too large for gRPC trailers.
_MAX_VIOLATIONS = 20

_Op = filter_pb2.Operator
_RANGE_OPERATORS: Final[dict[int, str]] = {
    _Op.OPERATOR_LT: "<",
    _Op.OPERATOR_LTE: "<=",
    _Op.OPERATOR_GT: ">",
    _Op.OPERATOR_GTE: ">=",
}
_KNOWN_OPERATORS: Final = frozenset(_Op.values()) - {_Op.OPERATOR_UNSPECIFIED}
# jsonb_typeof() names of each google.protobuf.Value kind: the only strings
# that ever reach the SQL text as type literals.
_JSON_TYPES: Final[dict[str, str]] = {
    "null_value": "null",
    "number_value": "number",
    "string_value": "string",
    "bool_value": "boolean",
    "struct_value": "object",
    "list_value": "array",
}


class SqlParams:
    """Bind values for one statement, numbered ``$start``, ``$start+1``, ….

    Start after the statement's own parameters so they can come first::

        params = SqlParams(start=3)       # the caller uses $1 and $2
        params.add("x")                   # -> "$3"
        await conn.fetch(sql, a, b, *params.values)

    :param start: the number of the first placeholder :meth:`add` hands out.
    """

    __slots__ = ("_start", "_values")

    def __init__(self, start: int = 1) -> None:
        if start < 1:
            raise ValueError("placeholders start at $1")
        self._start = start
        self._values: list[Any] = []

    def add(self, value: Any) -> str:
        """Bind ``value`` and return its placeholder, e.g. ``"$3"``."""
        self._values.append(value)
        return f"${self._start + len(self._values) - 1}"

    @property
    def values(self) -> list[Any]:
        """The bound values, in placeholder order (a copy)."""
        return list(self._values)

    def _truncate(self, count: int) -> None:
        del self._values[count:]


def compile_filter(
    filter: filter_pb2.Filter | None,
    column: str,
    params: SqlParams,
    *,
    field: str = "filter",
) -> str:
    """Compile ``filter`` into a SQL boolean expression over the jsonb ``column``.

    Values are bound through ``params``; the returned text holds only
    placeholders, validated path literals, fixed keywords and ``column``.
    An unset (or ``None``) filter compiles to ``TRUE``.

    :param filter: the request's filter, or ``None``.
    :param column: the jsonb column, a plain lower-case identifier chosen by
        the code (never by a request).
    :param params: where the values go; nothing is added when this raises.
    :param field: the request field that holds ``filter``, for violations
        (``"filter"`` gives ``filter.all_of.filters[2].condition.path``).
    :return: a parenthesised expression, e.g.
        ``(("data" #> '{status}') = $2::jsonb)``.
    :raises StrataError: INVALID_ARGUMENT with a BadRequest naming every
        violated field (at most 20): nesting deeper than 8, more than 64
        conditions, a bad path, operator or value.
    :raises ValueError: ``column`` is not a plain identifier (a bug in the caller).
    """
    quoted = _quote_column(column)
    if filter is None:
        return "TRUE"
    compiler = _Compiler(quoted, params, field)
    mark = len(params._values)
    try:
        sql = compiler.filter(filter, field, 1)
    except _TooManyViolations:
        sql = ""
    if compiler.errors:
        params._truncate(mark)
        raise invalid_argument(compiler.errors[:_MAX_VIOLATIONS])
    return sql


def json_path_sql(column: str, path: str, *, field: str = "path") -> str:
    """The jsonb value at ``path`` inside ``column``: ``("data" #> '{address,city}')``.

    The one place a request's path becomes SQL, for filters, ``ORDER BY`` and
    expression indexes alike: the same path always gives the same text, so an
    index on the expression matches. SQL NULL where the path is absent; a
    JSON null where the document holds null.

    :param column: the jsonb column, a plain lower-case identifier.
    :param path: dot-separated keys, e.g. ``"address.city"``; a segment of
        digits indexes an array (``"tags.0"``; ``"-1"`` is the last element).
    :param field: the request field that holds ``path``, for the violation.
    :raises StrataError: INVALID_ARGUMENT when ``path`` is not valid.
    :raises ValueError: ``column`` is not a plain identifier.
    """
    quoted = _quote_column(column)
    errors: list[FieldViolation] = []
    segments = validate_path(path, field, errors)
    if errors:
        raise invalid_argument(errors)
    return _path_sql(quoted, "#>", segments)


def validate_path(path: str, field: str, errors: list[FieldViolation]) -> list[str]:
    """Check ``path`` against the Filter rules and return its segments.

    Segments are 1-64 characters of ``[A-Za-z0-9_-]``, at most 16 of them,
    separated by single dots. On a bad path, appends one violation naming
    ``field`` to ``errors`` and returns ``[]``. The description never echoes
    the path.
    """
    problem = _path_problem(path)
    if problem is not None:
        errors.append(FieldViolation(field, problem))
        return []
    return path.split(".")


class _TooManyViolations(Exception):
    pass


class _Compiler:
    """One compilation: the SQL for each node, and the violations found so far."""

    def __init__(self, column: str, params: SqlParams, root: str) -> None:
        self.column = column
        self.root = root
        self.params = params
        self.errors: list[FieldViolation] = []
        self.conditions = 0

    def fail(self, field: str, description: str) -> None:
        self.errors.append(FieldViolation(field, description))
        if len(self.errors) >= _MAX_VIOLATIONS:
            raise _TooManyViolations

    def filter(self, node: filter_pb2.Filter, field: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            self.fail(field, f"filters nest more than {MAX_DEPTH} levels deep")
            return "FALSE"
        kind = node.WhichOneof("kind")
        if kind == "condition":
            return self.condition(node.condition, f"{field}.condition")
        if kind == "all_of":
            parts = self.children(node.all_of, f"{field}.all_of", depth)
            return f"({' AND '.join(parts)})" if parts else "TRUE"
        if kind == "any_of":
            parts = self.children(node.any_of, f"{field}.any_of", depth)
            return f"({' OR '.join(parts)})" if parts else "FALSE"
        if kind == "none_of":
            parts = self.children(node.none_of, f"{field}.none_of", depth)
            # IS NOT TRUE, not NOT: a condition on an absent path is NULL, and
            # NOT NULL would drop a document that no filter matches.
            return f"(({' OR '.join(parts)}) IS NOT TRUE)" if parts else "TRUE"
        return "TRUE"

    def children(self, node: filter_pb2.FilterList, field: str, depth: int) -> list[str]:
        return [
            self.filter(child, f"{field}.filters[{i}]", depth + 1) for i, child in enumerate(node.filters)
        ]

    def condition(self, cond: filter_pb2.Condition, field: str) -> str:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            # Reported once, on the whole filter; the rest is not looked at.
            self.errors.append(FieldViolation(self.root, f"holds more than {MAX_CONDITIONS} conditions"))
            raise _TooManyViolations
        before = len(self.errors)
        segments = validate_path(cond.path, f"{field}.path", self.errors)
        op = cond.op
        has_value = cond.HasField("value")
        problem = _value_problem(cond.value) if has_value else None
        if problem is not None:
            self.fail(f"{field}.value", problem)
        if op not in _KNOWN_OPERATORS:
            self.fail(f"{field}.op", "op must be set to a known operator")
        elif op == _Op.OPERATOR_IN:
            self.check_in(cond, field, has_value)
        elif problem is None:
            self.check_value(cond, field, op, has_value)
        if len(self.errors) >= _MAX_VIOLATIONS:
            raise _TooManyViolations
        if len(self.errors) > before:
            return "FALSE"
        return self.condition_sql(segments, op, cond)

    def check_in(self, cond: filter_pb2.Condition, field: str, has_value: bool) -> None:
        if has_value:
            self.fail(f"{field}.value", "OPERATOR_IN takes its values in values, not value")
        count = len(cond.values)
        if count == 0 or count > MAX_IN_VALUES:
            self.fail(f"{field}.values", f"OPERATOR_IN needs 1 to {MAX_IN_VALUES} values; got {count}")
            return
        for i, value in enumerate(cond.values):
            problem = _value_problem(value)
            if problem is not None:
                self.fail(f"{field}.values[{i}]", problem)

    def check_value(self, cond: filter_pb2.Condition, field: str, op: int, has_value: bool) -> None:
        if cond.values:
            self.fail(f"{field}.values", f"values is only for OPERATOR_IN; {_Op.Name(op)} takes value")
        if not has_value:
            if op != _Op.OPERATOR_EXISTS:
                self.fail(f"{field}.value", f"{_Op.Name(op)} needs a value")
            return
        given = _JSON_TYPES[cond.value.WhichOneof("kind") or "null_value"]
        if op in _RANGE_OPERATORS and given not in ("number", "string"):
            self.fail(f"{field}.value", f"{_Op.Name(op)} compares a number or a string, not {given}")
        elif op == _Op.OPERATOR_PREFIX and given != "string":
            self.fail(f"{field}.value", f"OPERATOR_PREFIX needs a string, not {given}")
        elif op == _Op.OPERATOR_EXISTS and given != "boolean":
            self.fail(f"{field}.value", f"OPERATOR_EXISTS takes true, false or no value, not {given}")

    def condition_sql(self, segments: list[str], op: int, cond: filter_pb2.Condition) -> str:
        path = _path_sql(self.column, "#>", segments)
        value = cond.value
        if op == _Op.OPERATOR_EQ:
            return f"({path} = {self.jsonb(value)})"
        if op == _Op.OPERATOR_NE:
            return f"({path} IS DISTINCT FROM {self.jsonb(value)})"
        if op in _RANGE_OPERATORS:
            sign = _RANGE_OPERATORS[op]
            if value.WhichOneof("kind") == "number_value":
                return f"({path} {sign} {self.jsonb(value)} AND jsonb_typeof({path}) = 'number')"
            # jsonb orders strings by the database collation; the spec says code points.
            text = _path_sql(self.column, "#>>", segments)
            return f"(jsonb_typeof({path}) = 'string' AND ({text} COLLATE \"C\") {sign} {self.text(value)})"
        if op == _Op.OPERATOR_IN:
            values = [_json_text(v) for v in cond.values]
            return f"({path} = ANY({self.params.add(values)}::jsonb[]))"
        if op == _Op.OPERATOR_CONTAINS:
            element = f"({path} @> {self.params.add(json.dumps([_to_python(value)]))}::jsonb)"
            if value.WhichOneof("kind") != "string_value":
                return element
            text = _path_sql(self.column, "#>>", segments)
            substring = f"(jsonb_typeof({path}) = 'string' AND strpos({text}, {self.text(value)}) > 0)"
            return f"({element} OR {substring})"
        if op == _Op.OPERATOR_EXISTS:
            absent = cond.HasField("value") and not value.bool_value
            return f"({path} IS NULL)" if absent else f"({path} IS NOT NULL)"
        # OPERATOR_PREFIX: the only operator left after validation.
        text = _path_sql(self.column, "#>>", segments)
        # In C collation, like the range comparisons: a declared path's text index serves both.
        prefix = self.text(value)
        return f"(jsonb_typeof({path}) = 'string' AND starts_with(({text} COLLATE \"C\"), {prefix}))"

    def jsonb(self, value: struct_pb2.Value) -> str:
        return f"{self.params.add(_json_text(value))}::jsonb"

    def text(self, value: struct_pb2.Value) -> str:
        return f"{self.params.add(value.string_value)}::text"


def _quote_column(column: str) -> str:
    if not _COLUMN.fullmatch(column):
        raise ValueError(f"column must be a plain lower-case identifier, got {column!r}")
    # Quoted so that a reserved word ("order", "user") works as well.
    return f'"{column}"'


def _path_sql(quoted_column: str, operator: str, segments: list[str]) -> str:
    # Written as Postgres itself prints the text[]: bare segments, except that
    # a segment spelling NULL is quoted (bare, it would be an SQL NULL element).
    elements = ",".join(f'"{s}"' if s.upper() == "NULL" else s for s in segments)
    return f"({quoted_column} {operator} '{{{elements}}}')"


def _path_problem(path: str) -> str | None:
    if not path:
        return "path is required"
    segments = path.split(".")
    if len(segments) > MAX_PATH_SEGMENTS:
        return f"path has more than {MAX_PATH_SEGMENTS} segments"
    for segment in segments:
        if not segment:
            return "path has an empty segment (leading, trailing or doubled dot)"
        if not _SEGMENT.fullmatch(segment):
            if len(segment) > 64:
                return "path segments are at most 64 characters"
            return "path segments are 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"
    return None


def _value_problem(value: struct_pb2.Value) -> str | None:
    """Why ``value`` cannot be a jsonb parameter, or None when it can."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return "value has no kind set"
    if kind == "number_value":
        if not math.isfinite(value.number_value):
            return "numbers must be finite (JSON has no NaN or Infinity)"
    elif kind == "string_value":
        if "\x00" in value.string_value:
            return _NUL
    elif kind == "struct_value":
        for key, item in value.struct_value.fields.items():
            if "\x00" in key:
                return _NUL
            problem = _value_problem(item)
            if problem is not None:
                return problem
    elif kind == "list_value":
        for item in value.list_value.values:
            problem = _value_problem(item)
            if problem is not None:
                return problem
    return None


_NUL = "strings must not contain U+0000 (PostgreSQL jsonb and text cannot hold it)"


def _json_text(value: struct_pb2.Value) -> str:
    return json.dumps(_to_python(value), allow_nan=False)


def _to_python(value: struct_pb2.Value) -> Any:
    """The JSON-ready Python value of a (validated) ``google.protobuf.Value``."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        # 10, not 10.0, where that is exact; jsonb compares them equal anyway.
        if number.is_integer() and abs(number) < 2**53:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: _to_python(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_to_python(item) for item in value.list_value.values]
    return None

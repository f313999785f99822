"""shared.storage.filters against the real Postgres: every operator and combinator selects
exactly the documents an independent Python reading of the Filter spec selects.
"""

from __future__ import annotations

import json
import operator
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from google.protobuf import json_format
from strata.common.v1 import filter_pb2

from shared.api.errors import Code, StrataError, from_exception
from shared.storage.filters import SqlParams, compile_filter, json_path_sql
from tests.support.documents import all_of, any_of, cond, make, none_of, null_cond

SQL_NULL = object()
"""A row whose data column is SQL NULL (not a JSON null)."""

DOCS: dict[int, Any] = {
    1: {
        "status": "active",
        "score": 10,
        "name": "alice",
        "tags": ["a", "b"],
        "address": {"city": "Berlin", "zip": "10115"},
    },
    2: {"status": "inactive", "score": 10.0, "name": "Bob", "tags": ["b"], "address": {"city": "Paris"}},
    3: {"status": "active", "score": "10", "name": "carol", "tags": [], "address": {"city": None}},
    4: {"status": None, "score": 3.5, "name": "Émile", "tags": ["a", 1, True, None]},
    5: {"score": -2, "name": "zoë", "tags": "a,b", "note": "hello world"},
    6: {},
    7: {"status": "active", "score": 100, "name": "ab", "tags": [["x"], {"k": 1, "j": 2}]},
    8: {"status": "pending", "score": True, "name": "a", "tags": ["ab"]},
    9: {"status": "ACTIVE", "score": [10], "name": "B", "nested": {"deep": {"deeper": {"value": 42}}}},
    10: {"score": {"v": 10}, "name": "a'b; DROP TABLE x; --", "note": "$1 \\ \" '"},
    11: {"score": 1e3, "name": "日本", "tags": ["日本", "x"]},
    12: {"score": 0, "name": "", "tags": [0]},
    13: {"score": 1, "name": "1"},
    14: {"score": None, "name": None},
    15: {"status": "active", "score": 9.99, "name": "alicia", "address": {"city": "berlin"}},
    16: {"list": [{"a": 1}, {"a": 2}], "score": 5, "name": "~tilde"},
    17: {"null": {"x": 1}, "score": 2, "name": "NULL"},
    18: {"status": "active", "score": 11, "tags": ["a", "b", "c"], "flag": False},
    19: {"flag": True, "score": "abc", "name": "Zed"},
    20: {"status": ["active"], "score": 12, "name": "émile"},
    21: {"status": "active", "score": 1.0, "name": "a-b", "deep": {"a": {"b": {"c": {"d": {"e": 1}}}}}},
    22: SQL_NULL,
    23: [1, "a", {"b": 2}],
    24: "just a string",
}


# -- the reference: the proto's comments, read literally, in Python ------------

MISSING = object()


def lookup(doc: Any, path: str) -> Any:
    """The value at ``path``, or MISSING; a digit segment indexes an array."""
    current = MISSING if doc is SQL_NULL else doc
    for segment in path.split("."):
        if isinstance(current, dict):
            current = current.get(segment, MISSING)
        elif isinstance(current, list) and re.fullmatch(r"-?[0-9]+", segment):
            index = int(segment)
            index = index + len(current) if index < 0 else index
            current = current[index] if 0 <= index < len(current) else MISSING
        else:
            return MISSING
    return current


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def json_equal(a: Any, b: Any) -> bool:
    if json_type(a) != json_type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def json_contains(a: Any, b: Any) -> bool:
    """jsonb's structural containment (``a @> b``) below the top level."""
    if json_type(a) != json_type(b):
        return False
    if isinstance(a, dict):
        return all(k in a and json_contains(a[k], v) for k, v in b.items())
    if isinstance(a, list):
        return all(any(json_contains(x, y) for x in a) for y in b)
    return json_equal(a, b)


RANGES: dict[int, Callable[[Any, Any], bool]] = {
    filter_pb2.OPERATOR_LT: operator.lt,
    filter_pb2.OPERATOR_LTE: operator.le,
    filter_pb2.OPERATOR_GT: operator.gt,
    filter_pb2.OPERATOR_GTE: operator.ge,
}


def reference_matches(doc: Any, node: filter_pb2.Filter) -> bool:
    kind = node.WhichOneof("kind")
    if kind is None:
        return True
    if kind == "condition":
        return condition_matches(doc, node.condition)
    children = [reference_matches(doc, child) for child in getattr(node, kind).filters]
    return {"all_of": all, "any_of": any, "none_of": lambda c: not any(c)}[kind](children)


def condition_matches(doc: Any, cond: filter_pb2.Condition) -> bool:
    found = lookup(doc, cond.path)
    value = json_format.MessageToDict(cond.value) if cond.HasField("value") else MISSING
    op = cond.op
    if op == filter_pb2.OPERATOR_EQ:
        return found is not MISSING and json_equal(found, value)
    if op == filter_pb2.OPERATOR_NE:
        return found is MISSING or not json_equal(found, value)
    if op in RANGES:
        return found is not MISSING and json_type(found) == json_type(value) and RANGES[op](found, value)
    if op == filter_pb2.OPERATOR_IN:
        options = [json_format.MessageToDict(v) for v in cond.values]
        return found is not MISSING and any(json_equal(found, v) for v in options)
    if op == filter_pb2.OPERATOR_CONTAINS:
        if isinstance(found, list) and any(json_contains(element, value) for element in found):
            return True
        return isinstance(found, str) and isinstance(value, str) and value in found
    if op == filter_pb2.OPERATOR_EXISTS:
        wanted = True if value is MISSING else value
        return (found is not MISSING) == wanted
    if op == filter_pb2.OPERATOR_PREFIX:
        return isinstance(found, str) and found.startswith(value)
    raise AssertionError(f"no reference for {op}")


def reference_ids(node: filter_pb2.Filter) -> list[int]:
    return [doc_id for doc_id, doc in DOCS.items() if reference_matches(doc, node)]


# -- filters -------------------------------------------------------------------


HOSTILE = ["'; DROP TABLE x; --", "$1", "\\", "\\\\'", '"', "'", "') OR TRUE --", "{a,b}", "%", "_"]

# Every operator and combinator, on every kind of document. Each must select
# exactly what the reference selects.
CASES: dict[str, Any] = {
    "eq string": cond("status", "EQ", "active"),
    "eq number matches 1 and 1.0": cond("score", "EQ", 10),
    "eq number written as 1.0": cond("score", "EQ", 1.0),
    "eq string '10' is not the number 10": cond("score", "EQ", "10"),
    "eq is case sensitive": cond("status", "EQ", "ACTIVE"),
    "eq bool": cond("flag", "EQ", False),
    "eq null": null_cond("status", "EQ"),
    "eq array": cond("tags", "EQ", ["a", "b"]),
    "eq array order matters": cond("tags", "EQ", ["b", "a"]),
    "eq object": cond("address", "EQ", {"city": "Paris"}),
    "eq nested path": cond("address.city", "EQ", "Berlin"),
    "eq deep path": cond("nested.deep.deeper.value", "EQ", 42),
    "eq unicode": cond("name", "EQ", "Émile"),
    "eq empty string": cond("name", "EQ", ""),
    "eq array index": cond("tags.0", "EQ", "a"),
    "eq negative array index": cond("tags.-1", "EQ", "b"),
    "eq index into objects in an array": cond("list.1.a", "EQ", 2),
    "eq index into a root array": cond("0", "EQ", 1),
    "eq key named null": cond("null.x", "EQ", 1),
    "eq through a scalar": cond("name.x", "EQ", "a"),
    "ne string matches absent paths": cond("status", "NE", "active"),
    "ne number": cond("score", "NE", 10),
    "ne null": null_cond("status", "NE"),
    "lt number": cond("score", "LT", 5),
    "lte number": cond("score", "LTE", 10),
    "gt number": cond("score", "GT", 10),
    "gte number": cond("score", "GTE", 9.99),
    "gt negative": cond("score", "GT", -100),
    "lt string in code point order": cond("name", "LT", "a"),
    "gt string in code point order": cond("name", "GT", "z"),
    "gte string": cond("name", "GTE", "alice"),
    "lte string": cond("name", "LTE", "B"),
    "gt string never matches numbers": cond("score", "GT", "1"),
    "lt empty string matches nothing": cond("name", "LT", ""),
    "in mixed": cond("score", "IN", values=[10, "abc", 2, None]),
    "in strings": cond("status", "IN", values=["active", "pending"]),
    "in objects and arrays": cond("score", "IN", values=[{"v": 10}, [10]]),
    "in nothing that exists": cond("status", "IN", values=["gone"]),
    "in a thousand values": cond("score", "IN", values=[float(i) for i in range(-500, 500)]),
    "contains array element": cond("tags", "CONTAINS", "a"),
    "contains substring": cond("note", "CONTAINS", "o w"),
    "contains substring of unicode": cond("name", "CONTAINS", "mil"),
    "contains empty string": cond("name", "CONTAINS", ""),
    "contains number element": cond("tags", "CONTAINS", 1),
    "contains bool element": cond("tags", "CONTAINS", True),
    "contains null element": null_cond("tags", "CONTAINS"),
    "contains array element that is an array": cond("tags", "CONTAINS", ["x"]),
    "contains object element": cond("tags", "CONTAINS", {"k": 1}),
    "contains empty object": cond("tags", "CONTAINS", {}),
    "contains on a root array": cond("2", "CONTAINS", {}),
    "contains number never matches strings": cond("name", "CONTAINS", 1),
    "exists": cond("status", "EXISTS"),
    "exists true": cond("status", "EXISTS", True),
    "exists false": cond("status", "EXISTS", False),
    "exists nested null": cond("address.city", "EXISTS"),
    "prefix": cond("name", "PREFIX", "a"),
    "prefix unicode": cond("name", "PREFIX", "é"),
    "prefix empty matches every string": cond("name", "PREFIX", ""),
    "prefix never matches numbers": cond("score", "PREFIX", "1"),
    "unset": {},
    "all_of empty": {"all_of": {}},
    "any_of empty": {"any_of": {}},
    "none_of empty": {"none_of": {}},
    "all_of": all_of(cond("status", "EQ", "active"), cond("score", "GTE", 10)),
    "any_of": any_of(cond("name", "PREFIX", "a"), cond("score", "LT", 0)),
    "none_of with absent paths": none_of(cond("status", "EQ", "active"), cond("score", "GT", 10)),
    "none_of of a lone condition": none_of(cond("score", "EQ", 10)),
    "none_of inside none_of": none_of(none_of(cond("status", "EQ", "active"))),
    "none_of inside all_of": all_of(cond("score", "EXISTS"), none_of(cond("tags", "CONTAINS", "a"))),
    "unset inside any_of": any_of({}, cond("score", "EQ", 10)),
    "deep combination": all_of(
        any_of(
            all_of(cond("status", "EQ", "active"), none_of(cond("tags", "CONTAINS", "c"))),
            all_of(cond("name", "PREFIX", "B"), any_of(cond("score", "IN", values=[10, [10]]))),
        ),
        none_of(cond("address.city", "EQ", "Paris"), null_cond("status", "EQ")),
        cond("score", "NE", "nope"),
    ),
    "eight levels deep": all_of(
        any_of(all_of(any_of(all_of(any_of(none_of(cond("score", "GT", 10)), cond("x", "EXISTS")))))),
        cond("score", "EXISTS"),
    ),
}
for i, hostile in enumerate(HOSTILE):
    CASES[f"hostile {i} eq"] = cond("name", "EQ", hostile)
    CASES[f"hostile {i} ne"] = cond("name", "NE", hostile)
    CASES[f"hostile {i} contains"] = cond("note", "CONTAINS", hostile)
    CASES[f"hostile {i} prefix"] = cond("name", "PREFIX", hostile)
    CASES[f"hostile {i} gt"] = cond("name", "GT", hostile)
    CASES[f"hostile {i} in"] = cond("name", "IN", values=[hostile, {hostile: hostile}])
    CASES[f"hostile {i} object"] = cond("score", "EQ", {hostile: [hostile]})


# -- the database --------------------------------------------------------------


@dataclass
class Docs:
    schema: str
    service: asyncpg.Connection  # as the services connect: not the owner
    owner: asyncpg.Connection

    async def ids(self, node: filter_pb2.Filter | dict[str, Any]) -> list[int]:
        node = make(node) if isinstance(node, dict) else node
        params = SqlParams()
        where = compile_filter(node, "data", params)
        rows = await self.service.fetch(
            f"SELECT id FROM {self.schema}.docs WHERE {where} ORDER BY id", *params.values
        )
        return [row["id"] for row in rows]


@pytest.fixture(scope="module")
async def docs(settings) -> AsyncIterator[Docs]:
    schema = f"filters_{uuid.uuid4().hex[:12]}"
    owner = await asyncpg.connect(settings.migrate_database_url)
    service = await asyncpg.connect(settings.database_url)
    try:
        role = await service.fetchval("SELECT quote_ident(current_user)")
        await owner.execute(
            f"CREATE SCHEMA {schema};"
            f"CREATE TABLE {schema}.docs (id int PRIMARY KEY, data jsonb);"
            f"GRANT USAGE ON SCHEMA {schema} TO {role};"
            f"GRANT SELECT ON {schema}.docs TO {role};"
        )
        await owner.executemany(
            f"INSERT INTO {schema}.docs (id, data) VALUES ($1, $2::jsonb)",
            [(i, None if d is SQL_NULL else json.dumps(d)) for i, d in DOCS.items()],
        )
        yield Docs(schema, service, owner)
    finally:
        await owner.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await service.close()
        await owner.close()


@pytest.mark.parametrize("name", list(CASES))
async def test_selects_what_the_reference_selects(docs, name):
    spec = CASES[name]
    node = make(spec) if isinstance(spec, dict) else spec
    assert await docs.ids(node) == reference_ids(node)


async def test_the_reference_cases_are_not_trivial():
    # Guard against a reference that agrees with the SQL by selecting nothing.
    nonempty = [name for name, spec in CASES.items() if reference_ids(make(spec))]
    assert len(nonempty) > len(CASES) // 2


# The spec's edge cases, spelled out by hand so that a bug shared by the
# reference and the SQL cannot hide.
NOT_ACTIVE = [2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 23, 24]
SPEC_EXAMPLES: dict[str, tuple[Any, list[int]]] = {
    "10 equals 10.0": (cond("score", "EQ", 10), [1, 2]),
    "1 equals 1.0": (cond("score", "EQ", 1), [13, 21]),
    "'10' is not 10": (cond("score", "EQ", "10"), [3]),
    "1000 equals 1e3": (cond("score", "EQ", 1000), [11]),
    "ne matches absent, null and other types": (cond("status", "NE", "active"), NOT_ACTIVE),
    "lt by code point: upper case first": (cond("name", "LT", "a"), [2, 9, 12, 13, 17, 19]),
    "gt by code point: accents and CJK last": (cond("name", "GT", "z"), [4, 5, 11, 16, 20]),
    "number range skips bools and strings": (cond("score", "LT", 5), [4, 5, 12, 13, 17, 21]),
    "string range skips numbers": (cond("score", "GT", "1"), [3, 19]),
    "exists counts null": (cond("status", "EXISTS"), [1, 2, 3, 4, 7, 8, 9, 15, 18, 20, 21]),
    "exists false": (
        cond("address.city", "EXISTS", False),
        [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    ),
    "eq null is only json null": (null_cond("status", "EQ"), [4]),
    "contains element or substring": (cond("tags", "CONTAINS", "a"), [1, 4, 5, 18]),
    "contains an array element": (cond("tags", "CONTAINS", ["x"]), [7]),
    "contains an object element structurally": (cond("tags", "CONTAINS", {"k": 1}), [7]),
    "in across types": (cond("score", "IN", values=[10, "abc"]), [1, 2, 19]),
    "prefix": (cond("name", "PREFIX", "a"), [1, 7, 8, 10, 15, 21]),
    "hostile text is just text": (cond("name", "EQ", "a'b; DROP TABLE x; --"), [10]),
    "quotes, backslash and $1 are just text": (cond("note", "CONTAINS", "$1 \\ \" '"), [10]),
    "none_of keeps documents without the path": (none_of(cond("status", "EQ", "active")), NOT_ACTIVE),
    "a key named null": (cond("null.x", "EQ", 1), [17]),
    "an index into a root array": (cond("0", "EQ", 1), [23]),
}


@pytest.mark.parametrize(("spec", "expected"), SPEC_EXAMPLES.values(), ids=list(SPEC_EXAMPLES))
async def test_spec_examples(docs, spec, expected):
    node = make(spec) if isinstance(spec, dict) else spec
    assert reference_ids(node) == expected
    assert await docs.ids(node) == expected


async def test_hostile_values_leave_the_table_alone(docs):
    for hostile in HOSTILE:
        assert await docs.ids(cond("name", "EQ", hostile)) == []
    assert await docs.service.fetchval(f"SELECT count(*) FROM {docs.schema}.docs") == len(DOCS)


async def test_the_callers_parameters_come_first(docs):
    params = SqlParams(start=2)
    where = compile_filter(make(cond("score", "EQ", 10)), "data", params)
    rows = await docs.service.fetch(
        f"SELECT id FROM {docs.schema}.docs WHERE id > $1 AND {where} ORDER BY id", 1, *params.values
    )
    assert [r["id"] for r in rows] == [2]


async def test_order_by_a_path(docs):
    order = json_path_sql("data", "score")
    rows = await docs.service.fetch(
        f"SELECT id FROM {docs.schema}.docs WHERE jsonb_typeof({order}) = 'number' ORDER BY {order}, id"
    )
    numbers = sorted(
        (d["score"], i)
        for i, d in DOCS.items()
        if isinstance(d, dict) and json_type(d.get("score")) == "number"
    )
    assert [r["id"] for r in rows] == [i for _, i in numbers]


# -- NUL: what Postgres does with it, and what the filter does instead ----------


async def test_postgres_cannot_hold_nul_in_jsonb_or_text(docs):
    with pytest.raises(asyncpg.UntranslatableCharacterError) as jsonb_error:
        await docs.service.fetchval("SELECT $1::jsonb", json.dumps("a\x00b"))
    with pytest.raises(asyncpg.CharacterNotInRepertoireError) as text_error:
        await docs.service.fetchval("SELECT $1::text", "a\x00b")
    # Had one got through, the error mapping would still say INVALID_ARGUMENT, but vaguely.
    for caught in (jsonb_error, text_error):
        assert from_exception(caught.value).code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("op", ["EQ", "NE", "CONTAINS", "PREFIX", "GT"])
async def test_a_nul_value_is_invalid_argument_before_any_sql(docs, op):
    with pytest.raises(StrataError) as caught:
        await docs.ids(cond("name", op, "a\x00b"))
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["filter.condition.value"]
    assert "U+0000" in caught.value.violations[0].description


# -- indexes -------------------------------------------------------------------


async def test_eq_and_ranges_use_an_expression_index_on_the_path(docs):
    table = f"{docs.schema}.many"
    await docs.owner.execute(
        f"CREATE TABLE {table} (id int, data jsonb);"
        f"INSERT INTO {table} SELECT i, jsonb_build_object('score', i % 1000, 'name', 'n' || i)"
        "  FROM generate_series(1, 5000) AS i;"
        f"CREATE INDEX many_score_idx ON {table} ((data #> '{{score}}'));"
        f"ANALYZE {table};"
    )
    for spec, count in [
        (cond("score", "EQ", 7), 5),
        (cond("score", "GT", 990), 45),
        (all_of(cond("score", "GTE", 10), cond("score", "LT", 12)), 10),
        (cond("score", "IN", values=[1, 2, 3]), 15),
    ]:
        params = SqlParams()
        where = compile_filter(make(spec), "data", params)
        query = f"SELECT id FROM {table} WHERE {where}"
        async with docs.owner.transaction():
            await docs.owner.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await docs.owner.fetch(f"EXPLAIN {query}", *params.values))
        assert "many_score_idx" in plan, plan
        assert len(await docs.owner.fetch(query, *params.values)) == count

"""shared.storage.filters: the SQL each Filter compiles to, its bind values, and every limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import struct_pb2
from strata.common.v1 import filter_pb2

from shared.api.errors import Code, StrataError
from shared.storage.filters import SqlParams, compile_filter, json_path_sql, validate_path
from tests.support.documents import cond, make

HOSTILE_STRINGS = [
    "'; DROP TABLE x; --",
    "$1",
    "$1::jsonb",
    "\\",
    "\\'",
    '"',
    "'",
    "''",
    "{a,b}",
    "') OR TRUE --",
    "\u202e\u200b",
    "%_",
]


def compile_(spec: dict[str, Any] | filter_pb2.Filter | None, start: int = 1) -> tuple[str, list[Any]]:
    params = SqlParams(start)
    node = make(spec) if isinstance(spec, dict) else spec
    return compile_filter(node, "data", params), params.values


def violations(spec: dict[str, Any] | filter_pb2.Filter, **kwargs: Any) -> dict[str, str]:
    node = make(spec) if isinstance(spec, dict) else spec
    with pytest.raises(StrataError) as caught:
        compile_filter(node, "data", SqlParams(), **kwargs)
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_ARGUMENT"
    return {v.field: v.description for v in caught.value.violations}


def nested(depth: int) -> dict[str, Any]:
    """A filter whose condition sits ``depth`` Filter levels down."""
    spec = cond("a", "EQ", 1)
    for _ in range(depth - 1):
        spec = {"all_of": {"filters": [spec]}}
    return spec


# -- SqlParams ---------------------------------------------------------------


def test_params_number_from_one_by_default():
    params = SqlParams()
    assert [params.add("a"), params.add("b")] == ["$1", "$2"]
    assert params.values == ["a", "b"]


def test_params_continue_after_the_callers_own():
    params = SqlParams(start=3)
    assert params.add(1) == "$3"
    assert params.add(2) == "$4"
    assert params.values == [1, 2]


def test_params_values_is_a_copy():
    params = SqlParams()
    params.add(1)
    params.values.append(2)
    assert params.values == [1]


def test_params_refuse_a_start_below_one():
    with pytest.raises(ValueError):
        SqlParams(0)


# -- one SQL shape per operator ----------------------------------------------


def test_eq_compares_the_jsonb_at_the_path_with_a_jsonb_parameter():
    assert compile_(cond("status", "EQ", "active")) == (
        """(("data" #> '{status}') = $1::jsonb)""",
        ['"active"'],
    )


def test_ne_is_distinct_from_so_absent_paths_match():
    assert compile_(cond("a.b", "NE", 5)) == ("""(("data" #> '{a,b}') IS DISTINCT FROM $1::jsonb)""", ["5"])


@pytest.mark.parametrize(("op", "sign"), [("LT", "<"), ("LTE", "<="), ("GT", ">"), ("GTE", ">=")])
def test_number_ranges_compare_jsonb_and_require_a_json_number(op, sign):
    sql, values = compile_(cond("score", op, 10))
    assert sql == (
        f"""(("data" #> '{{score}}') {sign} $1::jsonb AND jsonb_typeof(("data" #> '{{score}}')) = 'number')"""
    )
    assert values == ["10"]


@pytest.mark.parametrize(("op", "sign"), [("LT", "<"), ("LTE", "<="), ("GT", ">"), ("GTE", ">=")])
def test_string_ranges_compare_text_in_code_point_order(op, sign):
    sql, values = compile_(cond("name", op, "m"))
    assert sql == (
        f"""(jsonb_typeof(("data" #> '{{name}}')) = 'string'"""
        f""" AND (("data" #>> '{{name}}') COLLATE "C") {sign} $1::text)"""
    )
    assert values == ["m"]


def test_in_binds_one_jsonb_array_of_the_values():
    sql, values = compile_(cond("k", "IN", values=[1, "x", None, True, {"a": [1]}, [2]]))
    assert sql == """(("data" #> '{k}') = ANY($1::jsonb[]))"""
    assert values == [["1", '"x"', "null", "true", '{"a": [1]}', "[2]"]]


def test_contains_with_a_string_also_matches_substrings_of_a_string():
    sql, values = compile_(cond("tags", "CONTAINS", "x"))
    assert sql == (
        """((("data" #> '{tags}') @> $1::jsonb) OR (jsonb_typeof(("data" #> '{tags}')) = 'string'"""
        """ AND strpos(("data" #>> '{tags}'), $2::text) > 0))"""
    )
    assert values == ['["x"]', "x"]


@pytest.mark.parametrize("value", [1, True, None, {"a": 1}, [1, 2]])
def test_contains_with_another_value_is_array_containment_only(value):
    sql, values = compile_(
        cond("tags", "CONTAINS", value) if value is not None else _null_condition("CONTAINS")
    )
    assert sql == """(("data" #> '{tags}') @> $1::jsonb)"""
    assert values == [json.dumps([value])]


def _null_condition(op: str) -> filter_pb2.Filter:
    # ParseDict cannot tell "value": null from no value; build it directly.
    node = filter_pb2.Filter()
    node.condition.path = "tags"
    node.condition.op = filter_pb2.Operator.Value(f"OPERATOR_{op}")
    node.condition.value.null_value = struct_pb2.NULL_VALUE
    return node


def test_eq_null_matches_a_json_null():
    node = _null_condition("EQ")
    assert compile_(node) == ("""(("data" #> '{tags}') = $1::jsonb)""", ["null"])


@pytest.mark.parametrize("value", [True, None])
def test_exists_true_or_unset_is_not_null(value):
    assert compile_(cond("a", "EXISTS", value)) == ("""(("data" #> '{a}') IS NOT NULL)""", [])


def test_exists_false_is_null():
    assert compile_(cond("a", "EXISTS", False)) == ("""(("data" #> '{a}') IS NULL)""", [])


def test_prefix_is_starts_with_on_a_json_string():
    sql, values = compile_(cond("name", "PREFIX", "ab"))
    assert sql == (
        """(jsonb_typeof(("data" #> '{name}')) = 'string' """
        """AND starts_with((("data" #>> '{name}') COLLATE "C"), $1::text))"""
    )
    assert values == ["ab"]


def test_integral_numbers_bind_without_a_fraction_and_others_keep_it():
    assert compile_(cond("a", "EQ", 10.0))[1] == ["10"]
    assert compile_(cond("a", "EQ", 1.5))[1] == ["1.5"]
    assert compile_(cond("a", "EQ", -0.0))[1] == ["0"]
    assert compile_(cond("a", "EQ", 1e300))[1] == ["1e+300"]


def test_placeholders_continue_from_the_given_start():
    sql, values = compile_({"all_of": {"filters": [cond("a", "EQ", 1), cond("b", "PREFIX", "x")]}}, start=4)
    assert "$4::jsonb" in sql and "$5::text" in sql and "$1" not in sql
    assert values == ["1", "x"]


# -- combinators -------------------------------------------------------------


def test_an_unset_or_missing_filter_is_true():
    assert compile_(None) == ("TRUE", [])
    assert compile_(filter_pb2.Filter()) == ("TRUE", [])


@pytest.mark.parametrize(("kind", "sql"), [("all_of", "TRUE"), ("any_of", "FALSE"), ("none_of", "TRUE")])
def test_empty_lists(kind, sql):
    node = filter_pb2.Filter()
    getattr(node, kind).SetInParent()
    assert compile_(node) == (sql, [])


def test_all_of_is_and_any_of_is_or_each_parenthesised():
    sql, _ = compile_(
        {
            "all_of": {
                "filters": [
                    cond("a", "EQ", 1),
                    {"any_of": {"filters": [cond("b", "EQ", 2), cond("c", "EQ", 3)]}},
                ]
            }
        }
    )
    assert sql == (
        """((("data" #> '{a}') = $1::jsonb) AND ((("data" #> '{b}') = $2::jsonb) OR (("data" #> '{c}') = $3::jsonb)))"""
    )


def test_none_of_is_not_true_so_absent_paths_count_as_not_matching():
    sql, _ = compile_({"none_of": {"filters": [cond("a", "EQ", 1), cond("b", "EQ", 2)]}})
    assert sql == """(((("data" #> '{a}') = $1::jsonb) OR (("data" #> '{b}') = $2::jsonb)) IS NOT TRUE)"""


def test_an_unset_filter_inside_a_list_matches_everything():
    assert compile_({"any_of": {"filters": [{}]}}) == ("(TRUE)", [])


# -- paths -------------------------------------------------------------------


def test_the_same_path_gives_the_same_sql_every_time():
    first, _ = compile_(cond("address.city", "EQ", "Berlin"))
    second, _ = compile_({"all_of": {"filters": [cond("x", "EQ", 1), cond("address.city", "EQ", "Paris")]}})
    path = json_path_sql("data", "address.city")
    assert path == """("data" #> '{address,city}')"""
    assert first.count(path) == 1 and second.count(path) == 1


def test_digits_and_dashes_are_plain_segments():
    assert json_path_sql("data", "tags.0") == """("data" #> '{tags,0}')"""
    assert json_path_sql("data", "a-b.-1.A_Z") == """("data" #> '{a-b,-1,A_Z}')"""


@pytest.mark.parametrize("segment", ["null", "NULL", "Null"])
def test_a_segment_spelling_null_is_quoted_as_a_key_not_an_sql_null(segment):
    assert json_path_sql("data", f"a.{segment}") == f"""("data" #> '{{a,"{segment}"}}')"""


def test_a_reserved_word_column_is_quoted():
    assert json_path_sql("order", "a") == """("order" #> '{a}')"""


@pytest.mark.parametrize("column", ["", "Data", "data; DROP", 'da"ta', "1data", "a.b", "x" * 64, "dätä"])
def test_column_must_be_a_plain_identifier(column):
    with pytest.raises(ValueError):
        json_path_sql(column, "a")
    with pytest.raises(ValueError):
        compile_filter(None, column, SqlParams())


BAD_PATHS = [
    "",
    ".",
    "..",
    "a..b",
    ".a",
    "a.",
    "a b",
    "a'b",
    'a"b',
    "a,b",
    "a{b}",
    "a\\b",
    "a\x00b",
    "café",
    "\uff41",  # fullwidth a
    "\u0661",  # Arabic-Indic digit one
    "a\n",
    ".".join(["a"] * 17),
    "x" * 65,
    "a." + "x" * 65,
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_invalid_argument_naming_the_path_field(path):
    found = violations(
        {"all_of": {"filters": [cond("ok", "EQ", 1), cond("ok", "EQ", 1), cond(path, "EQ", 1)]}}
    )
    assert list(found) == ["filter.all_of.filters[2].condition.path"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_validate_path_reports_bad_paths_without_echoing_them(path):
    errors: list[Any] = []
    assert validate_path(path, "order_by", errors) == []
    assert [e.field for e in errors] == ["order_by"]
    if len(path) > 1:
        assert path not in errors[0].description


def test_validate_path_returns_the_segments():
    errors: list[Any] = []
    assert validate_path(".".join(["s"] * 16), "p", errors) == ["s"] * 16
    assert validate_path("x" * 64, "p", errors) == ["x" * 64]
    assert errors == []


def test_json_path_sql_refuses_a_bad_path_as_invalid_argument():
    with pytest.raises(StrataError) as caught:
        json_path_sql("data", "a b", field="order_by")
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["order_by"]


# -- limits and bad conditions -----------------------------------------------


def test_eight_levels_of_nesting_are_allowed():
    sql, _ = compile_(nested(8))
    assert sql.count("(((") >= 1


def test_nine_levels_of_nesting_are_invalid():
    field = "filter" + ".all_of.filters[0]" * 8
    assert violations(nested(9)) == {field: "filters nest more than 8 levels deep"}


def test_sixty_four_conditions_are_allowed():
    _, values = compile_({"any_of": {"filters": [cond("a", "EQ", i) for i in range(64)]}})
    assert len(values) == 64


def test_sixty_five_conditions_are_invalid():
    spec = {
        "any_of": {
            "filters": [cond("a", "EQ", i) for i in range(60)]
            + [{"all_of": {"filters": [cond("b", "EQ", i) for i in range(5)]}}]
        }
    }
    assert violations(spec) == {"filter": "holds more than 64 conditions"}


def test_in_takes_up_to_a_thousand_values():
    _, values = compile_(cond("a", "IN", values=list(range(1000))))
    assert len(values[0]) == 1000


@pytest.mark.parametrize("count", [0, 1001])
def test_in_with_no_or_too_many_values_is_invalid(count):
    spec = cond("a", "IN", values=list(range(count)))
    assert violations(spec) == {"filter.condition.values": f"OPERATOR_IN needs 1 to 1000 values; got {count}"}


def test_an_unset_operator_is_invalid():
    assert list(violations({"condition": {"path": "a", "value": 1}})) == ["filter.condition.op"]


def test_an_unknown_operator_number_is_invalid():
    node = filter_pb2.Filter()
    node.condition.path = "a"
    node.condition.op = 99  # type: ignore[assignment]
    node.condition.value.number_value = 1
    assert list(violations(node)) == ["filter.condition.op"]


@pytest.mark.parametrize("op", ["EQ", "NE", "LT", "LTE", "GT", "GTE", "CONTAINS", "PREFIX"])
def test_a_missing_value_is_invalid(op):
    assert list(violations(cond("a", op))) == ["filter.condition.value"]


def test_a_value_without_a_kind_is_invalid():
    node = filter_pb2.Filter()
    node.condition.path = "a"
    node.condition.op = filter_pb2.OPERATOR_EQ
    node.condition.value.SetInParent()
    assert violations(node) == {"filter.condition.value": "value has no kind set"}


@pytest.mark.parametrize(
    ("op", "value", "kind"),
    [
        ("LT", {"a": 1}, "object"),
        ("LTE", [1], "array"),
        ("GT", True, "boolean"),
        ("GTE", False, "boolean"),
        ("PREFIX", 1, "number"),
        ("PREFIX", ["a"], "array"),
        ("EXISTS", "yes", "string"),
        ("EXISTS", 1, "number"),
    ],
)
def test_a_value_of_the_wrong_kind_is_invalid(op, value, kind):
    found = violations(cond("a", op, value))
    assert list(found) == ["filter.condition.value"]
    assert found["filter.condition.value"].endswith(f"not {kind}")


@pytest.mark.parametrize("op", ["LT", "PREFIX"])
def test_a_null_value_is_the_wrong_kind_for_ranges_and_prefix(op):
    assert list(violations(_null_condition(op))) == ["filter.condition.value"]


def test_values_belong_to_in_and_value_to_the_others():
    assert list(violations(cond("a", "EQ", 1, values=[1]))) == ["filter.condition.values"]
    assert list(violations(cond("a", "IN", 1, values=[1]))) == ["filter.condition.value"]


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_invalid(number):
    node = filter_pb2.Filter()
    node.condition.path = "a"
    node.condition.op = filter_pb2.OPERATOR_EQ
    node.condition.value.number_value = number
    assert list(violations(node)) == ["filter.condition.value"]


@pytest.mark.parametrize(
    "value", ["a\x00b", "\x00", {"k": "\x00"}, {"k\x00": 1}, ["ok", ["\x00"]], {"a": {"b": [1, "x\x00"]}}]
)
@pytest.mark.parametrize("op", ["EQ", "CONTAINS"])
def test_nul_characters_anywhere_in_a_value_are_invalid(op, value):
    found = violations(cond("a", op, value))
    assert list(found) == ["filter.condition.value"]
    assert "U+0000" in found["filter.condition.value"]


def test_nul_in_one_in_value_names_that_value():
    found = violations(cond("a", "IN", values=["ok", "b\x00d", "ok"]))
    assert list(found) == ["filter.condition.values[1]"]


def test_nul_in_a_prefix_or_range_string_is_invalid():
    assert list(violations(cond("a", "PREFIX", "\x00"))) == ["filter.condition.value"]
    assert list(violations(cond("a", "GT", "a\x00"))) == ["filter.condition.value"]


def test_every_violation_is_reported_at_once():
    spec = {
        "any_of": {
            "filters": [
                cond("a..b", "EQ"),
                cond("x", "GT", True),
                {"none_of": {"filters": [cond("y", "IN")]}},
                {"condition": {"path": "z"}},
                cond("ok", "PREFIX", "fine"),
            ]
        }
    }
    assert set(violations(spec)) == {
        "filter.any_of.filters[0].condition.path",
        "filter.any_of.filters[0].condition.value",
        "filter.any_of.filters[1].condition.value",
        "filter.any_of.filters[2].none_of.filters[0].condition.values",
        "filter.any_of.filters[3].condition.op",
    }


def test_violations_are_capped_so_the_error_stays_small():
    spec = {"all_of": {"filters": [cond("bad path", "EQ", 1) for _ in range(64)]}}
    assert len(violations(spec)) == 20


def test_the_field_name_is_the_callers():
    assert list(violations(cond("a b", "EQ", 1), field="query.where")) == ["query.where.condition.path"]


def test_nothing_is_bound_when_the_filter_is_invalid():
    params = SqlParams()
    params.add("caller's own")
    spec = {"all_of": {"filters": [cond("a", "EQ", 1), cond("b", "EQ", 2), cond("c", "GT", True)]}}
    with pytest.raises(StrataError):
        compile_filter(make(spec), "data", params)
    assert params.values == ["caller's own"]
    assert params.add("next") == "$2"


# -- hostile values ----------------------------------------------------------


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
@pytest.mark.parametrize("op", ["EQ", "NE", "LT", "GTE", "CONTAINS", "PREFIX"])
def test_hostile_strings_reach_only_the_parameters(op, hostile):
    def spec(text: str) -> dict[str, Any]:
        return {"all_of": {"filters": [cond("a", op, text), cond("b", "IN", values=[text, {text: text}])]}}

    sql, values = compile_(spec(hostile))
    benign_sql, _ = compile_(spec("x"))
    # The text does not depend on the value at all: it is only ever bound.
    assert sql == benign_sql
    assert hostile in values or json.dumps(hostile) in values or json.dumps([hostile]) in values
    assert values[-1] == [json.dumps(hostile), json.dumps({hostile: hostile})]


# Shorter ones, and "$1::jsonb", are bits of any compiled filter's own text.
@pytest.mark.parametrize("hostile", [h for h in HOSTILE_STRINGS if len(h) > 2 and not h.startswith("$")])
def test_longer_hostile_strings_never_appear_in_the_sql(hostile):
    sql, _ = compile_(
        {"any_of": {"filters": [cond("a", op, hostile) for op in ("EQ", "CONTAINS", "PREFIX")]}}
    )
    assert hostile not in sql


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS)
def test_hostile_strings_as_keys_of_object_values_stay_in_the_parameters(hostile):
    sql, values = compile_(cond("a", "EQ", {hostile: [hostile]}))
    assert sql == compile_(cond("a", "EQ", {"x": ["x"]}))[0]
    assert json.loads(values[0]) == {hostile: [hostile]}

"""services.kv.keyspace: key ranges and the request limits, without a server."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from services.kv.keyspace import (
    KeyRange,
    Limits,
    cache_key,
    prefix_end,
    raise_if,
    revision_mismatch,
)
from shared.api.errors import Code, FieldViolation, StrataError
from shared.api.pagetoken import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from shared.config.settings import Settings

TEN_YEARS_S = 10 * 365 * 86400


@pytest.fixture
def limits() -> Limits:
    return Limits(Settings(kv_max_key_bytes=8, kv_max_value_bytes=16, kv_max_batch=3))


def _fields(errors: list[FieldViolation]) -> list[str]:
    return [e.field for e in errors]


# -- prefix_end --------------------------------------------------------------


def test_prefix_end_of_the_empty_prefix_is_unbounded():
    assert prefix_end("") is None


def test_prefix_end_of_one_character_is_the_next_character():
    assert prefix_end("a") == "b"


def test_prefix_end_increments_the_last_character():
    assert prefix_end("ab") == "ac"


def test_prefix_end_drops_trailing_max_code_points():
    assert prefix_end("ab\U0010ffff") == "ac"
    assert prefix_end("a\U0010ffff\U0010ffff") == "b"


def test_prefix_end_of_only_max_code_points_is_unbounded():
    assert prefix_end("\U0010ffff") is None
    assert prefix_end("\U0010ffff" * 3) is None


def test_prefix_end_skips_the_surrogate_range():
    assert prefix_end("x\ud7ff") == "x\ue000"
    assert prefix_end("x\ud7ff").encode() == "x\ue000".encode()  # valid UTF-8


def test_prefix_end_of_a_multibyte_character():
    assert prefix_end("é") == "ê"
    assert prefix_end("\uffff") == "\U00010000"


@pytest.mark.parametrize("prefix", ["a", "ab", "é", "x\ud7ff", "z\U0010ffff"])
def test_prefix_end_is_above_every_key_with_the_prefix(prefix):
    end = prefix_end(prefix)
    assert end is not None
    for suffix in ["", "\x01", "zzz", "\U0010ffff" * 4]:
        assert prefix + suffix < end
    assert not end.startswith(prefix)


# -- KeyRange ----------------------------------------------------------------


def test_single_range_contains_only_that_key():
    keys = KeyRange.single("k")
    assert keys == KeyRange("k", "k\x01")
    assert keys.contains("k")
    assert not keys.contains("k\x01")
    assert not keys.contains("ka")
    assert not keys.contains("j\U0010ffff")


def test_prefix_range_contains_keys_with_the_prefix():
    keys = KeyRange.prefix("user/")
    assert keys == KeyRange("user/", "user0")
    assert keys.contains("user/")
    assert keys.contains("user/\U0010ffff")
    assert not keys.contains("user")
    assert not keys.contains("user0")


def test_empty_prefix_range_contains_everything():
    keys = KeyRange.prefix("")
    assert keys == KeyRange("", None)
    assert keys.contains("")
    assert keys.contains("\U0010ffff" * 10)


def test_contains_is_half_open():
    keys = KeyRange("b", "d")
    assert keys.contains("b")
    assert keys.contains("c\U0010ffff")
    assert not keys.contains("d")
    assert not keys.contains("a")


def test_intersect_raises_the_start():
    assert KeyRange("b", "m").intersect("d", "") == KeyRange("d", "m")


def test_intersect_keeps_the_higher_own_start():
    assert KeyRange("d", "m").intersect("b", "") == KeyRange("d", "m")


def test_intersect_lowers_the_end():
    assert KeyRange("b", "m").intersect("", "f") == KeyRange("b", "f")


def test_intersect_keeps_the_lower_own_end():
    assert KeyRange("b", "f").intersect("", "m") == KeyRange("b", "f")


def test_intersect_bounds_an_unbounded_range():
    assert KeyRange("", None).intersect("c", "q") == KeyRange("c", "q")


def test_intersect_with_empty_end_stays_unbounded():
    assert KeyRange("a", None).intersect("", "") == KeyRange("a", None)


def test_intersect_of_disjoint_ranges_contains_nothing():
    keys = KeyRange.prefix("a").intersect("x", "")
    assert not any(keys.contains(k) for k in ["a", "ab", "x", "xa", "b"])


def test_cache_key_separates_tenant_namespace_and_key_with_nul():
    assert cache_key("t", "ns", "ké") == "t\x00ns\x00ké".encode()
    assert cache_key("t", "a", "b/c") != cache_key("t", "a/b", "c")
    assert cache_key("t1", "ns", "k") != cache_key("t2", "ns", "k")


# -- namespace ---------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["a", "A9", "0x", "team.a:b/c-d_e", "a" * 128])
def test_valid_namespaces_pass(limits, namespace):
    errors: list[FieldViolation] = []
    limits.namespace(namespace, errors)
    assert errors == []


def test_an_empty_namespace_is_required(limits):
    errors: list[FieldViolation] = []
    limits.namespace("", errors)
    assert errors == [FieldViolation("namespace", "required")]


@pytest.mark.parametrize(
    "namespace", ["a" * 129, "-a", ".a", "_a", "/a", "a b", "a\n", "é", "a*", "ns\x00", "a\tb"]
)
def test_invalid_namespaces_are_rejected(limits, namespace):
    errors: list[FieldViolation] = []
    limits.namespace(namespace, errors)
    assert _fields(errors) == ["namespace"]
    assert "A-Za-z0-9" in errors[0].description


def test_namespace_violations_use_the_given_field(limits):
    errors: list[FieldViolation] = []
    limits.namespace("-x", errors, field="items[2].namespace")
    assert _fields(errors) == ["items[2].namespace"]


# -- key ---------------------------------------------------------------------


def test_a_key_at_the_byte_limit_passes(limits):
    errors: list[FieldViolation] = []
    limits.key("12345678", errors)
    assert errors == []


def test_a_key_over_the_byte_limit_is_rejected_with_its_size(limits):
    errors: list[FieldViolation] = []
    limits.key("123456789", errors)
    assert errors == [FieldViolation("key", "is 9 bytes; the limit is 8")]


def test_key_size_counts_utf8_bytes_not_characters(limits):
    fits: list[FieldViolation] = []
    limits.key("éééé", fits)  # 4 characters, 8 bytes
    assert fits == []
    too_long: list[FieldViolation] = []
    limits.key("ééééé", too_long)  # 5 characters, 10 bytes
    assert too_long == [FieldViolation("key", "is 10 bytes; the limit is 8")]


def test_key_size_of_four_byte_characters(limits):
    errors: list[FieldViolation] = []
    limits.key("\U0001f600\U0001f600\U0001f600", errors)  # 3 characters, 12 bytes
    assert errors == [FieldViolation("key", "is 12 bytes; the limit is 8")]


def test_a_key_with_nul_is_rejected(limits):
    errors: list[FieldViolation] = []
    limits.key("a\x00b", errors)
    assert errors == [FieldViolation("key", "must not contain NUL")]


def test_an_oversized_key_with_nul_reports_both(limits):
    errors: list[FieldViolation] = []
    limits.key("\x00" * 9, errors)
    assert len(errors) == 2
    assert _fields(errors) == ["key", "key"]


def test_an_empty_key_is_required(limits):
    errors: list[FieldViolation] = []
    limits.key("", errors)
    assert errors == [FieldViolation("key", "required")]


def test_an_empty_key_passes_where_allowed(limits):
    errors: list[FieldViolation] = []
    limits.key("", errors, "prefix", allow_empty=True)
    assert errors == []


def test_key_violations_use_the_given_field(limits):
    errors: list[FieldViolation] = []
    limits.key("x" * 20, errors, "keys[3]")
    assert _fields(errors) == ["keys[3]"]


def test_default_key_limit_is_4096_bytes():
    limits = Limits(Settings())
    errors: list[FieldViolation] = []
    limits.key("é" * 2048, errors)
    assert errors == []
    limits.key("é" * 2048 + "a", errors)
    assert errors == [FieldViolation("key", "is 4097 bytes; the limit is 4096")]


# -- value / content type ------------------------------------------------------


def test_a_value_at_the_limit_passes(limits):
    errors: list[FieldViolation] = []
    limits.value(b"x" * 16, errors)
    limits.value(b"", errors)
    assert errors == []


def test_a_value_over_the_limit_is_rejected_with_its_size(limits):
    errors: list[FieldViolation] = []
    limits.value(b"x" * 17, errors)
    assert errors == [FieldViolation("value", "is 17 bytes; the limit is 16")]


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/json; charset=utf-8", "~" * 255])
def test_valid_content_types_pass(limits, content_type):
    errors: list[FieldViolation] = []
    limits.content_type(content_type, errors)
    assert errors == []


@pytest.mark.parametrize("content_type", ["x" * 256, "text/plain\n", "text/é", "a\tb", "\x7f"])
def test_invalid_content_types_are_rejected(limits, content_type):
    errors: list[FieldViolation] = []
    limits.content_type(content_type, errors)
    assert _fields(errors) == ["content_type"]


# -- ttl ---------------------------------------------------------------------


def test_an_absent_ttl_is_zero(limits):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(seconds=5), False, errors) == 0
    assert errors == []


def test_a_zero_ttl_means_no_expiry(limits):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(), True, errors) == 0
    assert errors == []


def test_ttl_is_converted_to_milliseconds(limits):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(seconds=2, nanos=500_000_000), True, errors) == 2500
    assert errors == []


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"), [(0, 1, 1), (0, 999_999, 1), (0, 1_000_001, 2), (1, 1, 1001)]
)
def test_sub_millisecond_ttl_rounds_up(limits, seconds, nanos, expected):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(seconds=seconds, nanos=nanos), True, errors) == expected
    assert errors == []


@pytest.mark.parametrize(("seconds", "nanos"), [(-1, 0), (0, -1), (-5, -500)])
def test_a_negative_ttl_is_rejected(limits, seconds, nanos):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(seconds=seconds, nanos=nanos), True, errors) == 0
    assert errors == [FieldViolation("ttl", "must not be negative")]


def test_a_ttl_of_ten_years_passes(limits):
    errors: list[FieldViolation] = []
    assert limits.ttl_ms(duration_pb2.Duration(seconds=TEN_YEARS_S), True, errors) == TEN_YEARS_S * 1000
    assert errors == []


def test_a_ttl_over_ten_years_is_rejected(limits):
    errors: list[FieldViolation] = []
    limits.ttl_ms(duration_pb2.Duration(seconds=TEN_YEARS_S + 1), True, errors, "items[0].ttl")
    assert errors == [FieldViolation("items[0].ttl", "must be at most ten years")]


# -- if_revision / batch / page size --------------------------------------------


def test_a_negative_if_revision_is_rejected(limits):
    errors: list[FieldViolation] = []
    limits.if_revision(0, errors)
    assert errors == []
    limits.if_revision(-1, errors)
    assert _fields(errors) == ["if_revision"]


def test_an_empty_batch_is_rejected(limits):
    errors: list[FieldViolation] = []
    limits.batch_size(0, errors, "keys")
    assert errors == [FieldViolation("keys", "at least one is required")]


def test_a_batch_over_the_limit_is_rejected(limits):
    errors: list[FieldViolation] = []
    limits.batch_size(3, errors, "items")
    assert errors == []
    limits.batch_size(4, errors, "items")
    assert errors == [FieldViolation("items", "has 4 entries; the limit is 3")]


def test_page_size_zero_means_the_default(limits):
    errors: list[FieldViolation] = []
    assert limits.page_size(0, errors) == DEFAULT_PAGE_SIZE == 100
    assert errors == []


@pytest.mark.parametrize("size", [1, 50, MAX_PAGE_SIZE])
def test_page_size_within_bounds_is_kept(limits, size):
    errors: list[FieldViolation] = []
    assert limits.page_size(size, errors) == size
    assert errors == []


@pytest.mark.parametrize("size", [-1, MAX_PAGE_SIZE + 1, 2**31 - 1])
def test_page_size_out_of_bounds_is_rejected(limits, size):
    errors: list[FieldViolation] = []
    limits.page_size(size, errors)
    assert _fields(errors) == ["page_size"]


# -- errors ------------------------------------------------------------------


def test_raise_if_without_errors_does_nothing():
    raise_if([])


def test_raise_if_lists_every_violation_in_one_invalid_argument():
    violations = [FieldViolation("namespace", "required"), FieldViolation("key", "required")]
    with pytest.raises(StrataError) as caught:
        raise_if(violations)
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.violations == tuple(violations)
    assert caught.value.message == "namespace: required; key: required"


def test_revision_mismatch_is_aborted_with_the_revisions():
    error = revision_mismatch("k", 3, 5, 9)
    assert error.code == Code.ABORTED
    assert error.reason == "REVISION_MISMATCH"
    assert error.metadata == {
        "key": "k",
        "expected_revision": "3",
        "current_revision": "5",
        "store_revision": "9",
    }

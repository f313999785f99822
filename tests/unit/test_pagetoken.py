"""shared.api.pagetoken: tokens round-trip for their own query and nothing else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random

import pytest
from google.rpc import error_details_pb2

from shared.api import pagetoken
from shared.api.errors import Code, StrataError
from shared.api.pagetoken import PageTokens, page_token_key

QUERY = ["kv.List", "ns-1", "pre/", "", "", False]
SECRET = b"unit-test-internal-secret"
# What each service's app.py builds from STRATA_INTERNAL_SECRET.
TOKENS = PageTokens(SECRET)
encode_page_token = TOKENS.encode
decode_page_token = TOKENS.decode
page_cursor = TOKENS.cursor


def _assert_rejected(token: str, query=QUERY, tokens: PageTokens = TOKENS) -> StrataError:
    with pytest.raises(StrataError) as caught:
        tokens.decode(token, query)
    error = caught.value
    assert error.code == Code.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in error.violations] == ["page_token"]
    assert "page_token" in error.message
    return error


@pytest.mark.parametrize(
    "cursor", ["pre/b", "", "ключ/é/\U0010ffff", 42, None, ["a", 1], {"key": "k", "revision": 7}]
)
def test_a_token_decodes_to_its_cursor(cursor):
    assert decode_page_token(encode_page_token(QUERY, cursor), QUERY) == cursor


def test_a_token_is_url_safe_without_padding():
    token = encode_page_token(QUERY, "x" * 50 + "ü")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_an_equal_query_decodes_a_token_of_another_list_object():
    token = encode_page_token(list(QUERY), "pre/c")
    assert decode_page_token(token, tuple(QUERY)) == "pre/c"


@pytest.mark.parametrize(
    "other",
    [
        ["kv.List", "ns-2", "pre/", "", "", False],
        ["kv.List", "ns-1", "pre/x", "", "", False],
        ["kv.List", "ns-1", "pre/", "a", "", False],
        ["kv.List", "ns-1", "pre/", "", "z", False],
        ["kv.List", "ns-1", "pre/", "", "", True],
        ["other.List", "ns-1", "pre/", "", "", False],
    ],
)
def test_a_token_for_another_query_is_invalid_argument_on_page_token(other):
    error = _assert_rejected(encode_page_token(QUERY, "pre/b"), other)
    assert "different query" in error.violations[0].description


def test_the_error_status_has_a_bad_request_on_page_token():
    with pytest.raises(StrataError) as caught:
        decode_page_token(encode_page_token(QUERY, "k"), ["kv.List", "other"])
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in caught.value.to_status("strata.kv.v1").details)
    assert [v.field for v in bad.field_violations] == ["page_token"]


@pytest.mark.parametrize("keep", [1, 5, 16, -1, -4])
def test_a_truncated_token_is_invalid_argument(keep):
    token = encode_page_token(QUERY, "pre/some-key")
    _assert_rejected(token[:keep])


@pytest.mark.parametrize("position", [0, 3, 10, 17, 25, 40])
def test_an_edited_token_is_invalid_argument(position):
    token = encode_page_token(QUERY, "pre/some-key")
    replacement = "A" if token[position] != "A" else "B"
    _assert_rejected(token[:position] + replacement + token[position + 1 :])


def test_a_token_with_an_edited_cursor_is_invalid_argument():
    token = encode_page_token(QUERY, "pre/b")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged = raw.replace(b"pre/b", b"pre/z")
    assert forged != raw
    _assert_rejected(base64.urlsafe_b64encode(forged).decode().rstrip("="))


def test_a_token_re_signed_with_another_key_is_invalid_argument():
    body = json.dumps({"v": 1, "q": "0" * 24, "c": "x"}).encode()
    signature = hmac.new(b"not-the-key", body, hashlib.sha256).digest()[:12]
    _assert_rejected(base64.urlsafe_b64encode(signature + body).decode())


@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_is_invalid_argument(seed):
    rng = random.Random(seed)
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    _assert_rejected(base64.urlsafe_b64encode(raw).decode())


@pytest.mark.parametrize(
    "token", ["not a token!", "%%%%", "ключ", "\x00\x01", "a.b.c", "eyJ2IjoxfQ", "////____----"]
)
def test_text_that_is_not_a_token_is_invalid_argument(token):
    _assert_rejected(token)


@pytest.mark.parametrize("token", ["", " ", "=", "==", "====", "A", "AA==", "\n"])
def test_empty_looking_tokens_are_invalid_argument(token):
    _assert_rejected(token)


def test_tokens_are_signed_with_a_key_derived_from_the_internal_secret():
    token = encode_page_token(QUERY, "pre/b")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    expected = hmac.new(page_token_key(SECRET), raw[12:], hashlib.sha256).digest()[:12]
    assert raw[:12] == expected
    assert page_token_key(SECRET) not in (SECRET, b"strata-page-token-v1")


def test_a_token_of_another_deployment_is_invalid_argument():
    token = encode_page_token(QUERY, "pre/b")
    _assert_rejected(token, tokens=PageTokens(b"another-deployment-secret"))


def test_a_token_signed_with_the_old_published_key_is_invalid_argument():
    body = json.dumps({"v": 1, "q": pagetoken._fingerprint(QUERY), "c": "pre/b"}).encode()
    signature = hmac.new(b"strata-page-token-v1", body, hashlib.sha256).digest()[:12]
    _assert_rejected(base64.urlsafe_b64encode(signature + body).decode())


@pytest.mark.parametrize(
    ("first", "cursor"), [("", "pre/b"), ("", ""), (0, 41), (0, -(2**63)), (0, 2**63 - 1)]
)
def test_page_cursor_returns_a_cursor_of_the_first_pages_type(first, cursor):
    assert page_cursor(encode_page_token(QUERY, cursor), QUERY, first) == cursor
    assert page_cursor("", QUERY, first) == first


@pytest.mark.parametrize(
    ("first", "cursor"),
    [
        ("", None),
        ("", 5),
        ("", ["a"]),
        ("", {"k": "v"}),
        ("", "a\x00b"),
        (0, "5"),
        (0, True),
        (0, 1.5),
        (0, None),
        (0, 2**63),
        (0, -(2**63) - 1),
        (0, 10**30),
    ],
)
def test_page_cursor_refuses_a_signed_cursor_of_another_type_or_range(first, cursor):
    with pytest.raises(StrataError) as caught:
        page_cursor(encode_page_token(QUERY, cursor), QUERY, first)
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_a_signed_body_nested_too_deep_is_invalid_argument():
    body = (
        b'{"v":1,"q":"'
        + pagetoken._fingerprint(QUERY).encode()
        + b'","c":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}"
    )
    signature = hmac.new(page_token_key(SECRET), body, hashlib.sha256).digest()[:12]
    _assert_rejected(base64.urlsafe_b64encode(signature + body).decode())

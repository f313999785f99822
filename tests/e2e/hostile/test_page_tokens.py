"""Page tokens: another tenant's, edited ones, ones signed with the old published key, and cursors
forged with the deployment's own key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
from typing import Any

import grpc
import pytest
from google.protobuf import message

from shared.api.callers import SCOPES, Caller
from shared.api.pagetoken import page_token_key
from tests.e2e.hostile.names import ATTACKER, ATTACKER_MARK, VICTIM, VICTIM_MARK
from tests.e2e.hostile.rpcs import LIST_RPCS, Rpc, params, request_for
from tests.e2e.hostile.stage import OK, SECRET, Hostile, report
from tests.support.calls import bearer

pytestmark = pytest.mark.e2e


# shared/api/pagetoken.py signs tokens with a key derived from the deployment's
# internal secret, which the suite knows (a caller does not): with it, the suite
# mints tokens with any cursor, as an insider or a leaked secret could.
PAGE_TOKEN_KEY = page_token_key(SECRET)
# What tokens were once signed with: a constant in the source, so anyone could mint one.
PUBLISHED_PAGE_TOKEN_KEY = b"strata-page-token-v1"
PAGE_TOKEN_SIGNATURE_BYTES = 12


async def _first_token(hostile: Hostile, rpc: Rpc, caller: Caller = ATTACKER) -> tuple[message.Message, str]:
    """A one-item first page's request and its next_page_token, asked as ``caller``."""
    request = request_for(rpc)
    request.page_size = 1
    body = request.SerializeToString()
    outcome = await hostile.call(rpc, body, "direct", hostile.signed(rpc, caller, body))
    assert outcome.code == OK, outcome
    token = rpc.response(outcome.response).next_page_token
    assert token, f"{rpc.id}: no second page to try tokens on"
    return request, token


def _raw_token(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _encode_token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _edited_tokens(token: str) -> dict[str, str]:
    raw = _raw_token(token)
    flips = {
        f"bit {bit} of byte {at} flipped": _encode_token(
            raw[:at] + bytes([raw[at] ^ (1 << bit)]) + raw[at + 1 :]
        )
        for at, bit in ((0, 0), (5, 7), (11, 3), (12, 0), (13, 1), (len(raw) // 2, 4), (len(raw) - 1, 6))
    }
    return flips | {
        "last character cut": token[:-1],
        "cut in half": token[: len(token) // 2],
        "first character only": token[:1],
        "one character added": token + "A",
        "not base64": "!!!!~~~~",
        "padding only": "====",
        "not ASCII": "é" * 8,
        "base64 of random bytes": _encode_token(random.Random(token).randbytes(48)),
        "10,000 characters": "A" * 10_000,
        "JSON without a signature": _encode_token(json.dumps({"v": 1, "q": "", "c": ""}).encode()),
    }


# Cursors signed with the deployment's key: every type and edge a decoder meets.
_FORGED_CURSORS: tuple[Any, ...] = (
    None,
    [],
    {},
    -1,
    10**30,
    1e308,
    "x",
    "\x00",
    "9" * 5000,
    "2020-01-01",
    [None, 5],
    ["", ""],
    ["not-a-time", "a"],
    [5, "a"],
    [{"a": 1}, "a"],
    [[1], "a"],
    ["2020-01-01T00:00:00+00:00", "a"],
)


def _forged_token(token: str, cursor: Any, key: bytes = PAGE_TOKEN_KEY) -> str:
    """``token`` (so its query fingerprint) with another cursor, signed with ``key`` as Strata signs."""
    raw = _raw_token(token)
    body = json.loads(raw[PAGE_TOKEN_SIGNATURE_BYTES:])
    body["c"] = cursor
    encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    signature = hmac.new(key, encoded, hashlib.sha256).digest()[:PAGE_TOKEN_SIGNATURE_BYTES]
    return _encode_token(signature + encoded)


def _cursor_of(token: str) -> Any:
    """The cursor inside one of Strata's tokens."""
    return json.loads(_raw_token(token)[PAGE_TOKEN_SIGNATURE_BYTES:])["c"]


def _with_token(request: message.Message, token: str) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.page_token = token
    return copy.SerializeToString()


TENANT_LIST_RPCS = [rpc for rpc in LIST_RPCS if rpc.tenant_scoped]


@pytest.mark.parametrize("rpc", params(TENANT_LIST_RPCS))
async def test_another_tenants_page_token_reveals_nothing_of_it(hostile: Hostile, rpc: Rpc) -> None:
    request, token = await _first_token(hostile, rpc)
    victim = Caller(VICTIM, frozenset(SCOPES), "victim")
    body = _with_token(request, token)
    for via, metadata in (
        ("gateway", bearer(hostile.victim_key)),
        ("direct", hostile.signed(rpc, victim, body)),
    ):
        outcome = await hostile.call(rpc, body, via, metadata)
        assert outcome.problem() is None, f"{via}: {outcome}"
        assert ATTACKER_MARK.encode() not in outcome.response, f"{via}: the victim got the attacker's data"


@pytest.mark.parametrize("rpc", params(TENANT_LIST_RPCS))
async def test_another_tenants_page_token_is_invalid_argument(hostile: Hostile, rpc: Rpc) -> None:
    request, token = await _first_token(hostile, rpc)
    victim = Caller(VICTIM, frozenset(SCOPES), "victim")
    body = _with_token(request, token)
    for via, metadata in (
        ("gateway", bearer(hostile.victim_key)),
        ("direct", hostile.signed(rpc, victim, body)),
    ):
        outcome = await hostile.call(rpc, body, via, metadata)
        assert (outcome.code, outcome.violations) == (grpc.StatusCode.INVALID_ARGUMENT, ("page_token",)), via


@pytest.mark.parametrize("rpc", params(LIST_RPCS))
async def test_edited_page_tokens_are_invalid_argument(hostile: Hostile, rpc: Rpc) -> None:
    request, token = await _first_token(hostile, rpc)
    edits = _edited_tokens(token)
    failures = [
        f"{label} ({list(edits)[int(label.split('#')[1])]}): {outcome.code.name} {outcome.violations}"
        for label, outcome in await hostile.both(rpc, [_with_token(request, t) for t in edits.values()])
        if (outcome.code, outcome.violations) != (grpc.StatusCode.INVALID_ARGUMENT, ("page_token",))
    ]
    report(failures, "edited page tokens accepted")


@pytest.mark.parametrize("rpc", params(LIST_RPCS))
async def test_page_tokens_signed_with_the_old_published_key_are_invalid_argument(
    hostile: Hostile, rpc: Rpc
) -> None:
    # Tokens were once signed with a constant in the source, so anyone could mint one with any cursor.
    request, token = await _first_token(hostile, rpc)
    resigned = _forged_token(token, _cursor_of(token), PUBLISHED_PAGE_TOKEN_KEY)
    failures = [
        f"{label}: {outcome.code.name} {outcome.violations}"
        for label, outcome in await hostile.both(rpc, [_with_token(request, resigned)])
        if (outcome.code, outcome.violations) != (grpc.StatusCode.INVALID_ARGUMENT, ("page_token",))
    ]
    report(failures, "a token signed with the published key accepted")


@pytest.mark.parametrize("rpc", params(LIST_RPCS))
async def test_page_tokens_signed_with_the_deployment_key_never_fail_internally(
    hostile: Hostile, rpc: Rpc
) -> None:
    # Only the deployment can sign tokens now; were its secret out, any cursor could still be
    # signed for one's own query, and such a cursor must be refused, never fail internally.
    request, token = await _first_token(hostile, rpc)
    # The suite signs as the stack does: its own token, re-signed, is still accepted.
    for label, outcome in await hostile.both(
        rpc, [_with_token(request, _forged_token(token, _cursor_of(token)))]
    ):
        assert outcome.code == OK, f"{label}: {outcome}"
    bodies = [_with_token(request, _forged_token(token, cursor)) for cursor in _FORGED_CURSORS]
    failures = []
    for label, outcome in await hostile.both(rpc, bodies):
        cursor = _FORGED_CURSORS[int(label.split("#")[1])]
        problem = outcome.problem()
        if problem is None and outcome.code not in (OK, grpc.StatusCode.INVALID_ARGUMENT):
            problem = outcome.code.name
        if problem is None and rpc.tenant_scoped and VICTIM_MARK.encode() in outcome.response:
            problem = "the answer carries the victim's data"
        if problem is not None:
            failures.append(f"{label} cursor {cursor!r:.40}: {problem}")
    report(failures, "forged cursors answered unclearly")
    await hostile.assert_healthy()

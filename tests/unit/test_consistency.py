"""Consistency tokens: WAL positions in Postgres's notation, per-call tracking, the gateway's memory."""

from __future__ import annotations

import asyncio
import contextvars
import time

import pytest

from gateway.consistency import CallerTokens
from shared.api.errors import Code, StrataError
from shared.storage.breaker import CircuitBreaker
from shared.storage.consistency import (
    TOKEN_KEY,
    begin_call,
    format_lsn,
    note_commit,
    parse_lsn,
    required_lsn,
    token_from_metadata,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_lsns_read_and_write_as_postgres_does(text, value):
    assert parse_lsn(text) == value
    assert format_lsn(value) == text
    assert parse_lsn(text.lower()) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "/1",
        "1/",
        "x/1",
        "1/2/3",
        "123456789/0",
        "0/123456789",
        "-1/0",
        "0/ 1",
        "0x1/0",
        "0/+1",
        "0/1_0",
    ],
)
def test_anything_else_is_not_an_lsn(text):
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_a_malformed_token_is_invalid_argument_naming_the_key():
    with pytest.raises(StrataError) as caught:
        token_from_metadata([(TOKEN_KEY, "'; DROP TABLE kv.entries; --")])
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.violations[0].field == TOKEN_KEY


def test_the_newest_of_several_tokens_counts_and_other_keys_are_ignored():
    metadata = [("other", "9/0"), (TOKEN_KEY, "0/10"), (TOKEN_KEY, b"1/0"), (TOKEN_KEY, "0/FFFF")]
    assert token_from_metadata(metadata) == 1 << 32
    assert token_from_metadata(None) == 0


def test_a_call_requires_what_it_was_sent_and_what_it_wrote_itself():
    def call() -> tuple[int, int, int]:
        tokens = begin_call([(TOKEN_KEY, "0/100")])
        before = required_lsn()
        note_commit(0x50)  # older than required: reads still need 0/100
        note_commit(0x200)
        note_commit(0x180)  # never goes back
        return before, required_lsn(), tokens.committed

    assert contextvars.copy_context().run(call) == (0x100, 0x200, 0x200)
    # Outside any call nothing is required, and a commit noted there goes nowhere.
    assert contextvars.copy_context().run(required_lsn) == 0
    contextvars.copy_context().run(note_commit, 5)


async def test_tasks_a_call_starts_share_its_tokens():
    # A delete finished in a task of its own (finish_despite_caller) still reports to its call.
    tokens = begin_call(())
    await asyncio.ensure_future(asyncio.sleep(0, result=None))
    await asyncio.create_task(_note(0x42))
    assert tokens.committed == 0x42


async def _note(lsn: int) -> None:
    note_commit(lsn)


def test_the_gateway_adds_each_callers_newest_token_to_its_calls():
    tokens = CallerTokens()
    assert tokens.attach("key-a", [("x", "1")]) == [("x", "1")]
    tokens.observe("key-a", [("grpc-status-details-bin", b"..."), (TOKEN_KEY, "0/20")])
    tokens.observe("key-a", [(TOKEN_KEY, "0/10")])  # older: kept the newer
    tokens.observe("key-a", [(TOKEN_KEY, "garbage")])  # ignored, never trusted
    assert tokens.attach("key-a", []) == [(TOKEN_KEY, "0/20")]
    assert tokens.attach("key-b", []) == []  # one caller's writes do not slow another's reads


def test_the_gateway_forgets_the_least_recently_used_callers_first():
    tokens = CallerTokens(capacity=2)
    tokens.observe("a", [(TOKEN_KEY, "0/1")])
    tokens.observe("b", [(TOKEN_KEY, "0/2")])
    tokens.attach("a", [])  # a used again: b is now the oldest
    tokens.observe("c", [(TOKEN_KEY, "0/3")])
    assert len(tokens) == 2
    assert tokens.attach("b", []) == []
    assert tokens.attach("a", []) == [(TOKEN_KEY, "0/1")]


def test_a_tripped_breaker_opens_at_once_and_a_success_after_the_cooldown_closes_it():
    breaker = CircuitBreaker(threshold=3, cooldown_s=0.05)
    breaker.trip()
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.06)
    assert breaker.state == "half-open"
    breaker.record_success()
    assert breaker.state == "closed"

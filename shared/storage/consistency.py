"""Read-your-writes across streaming replicas: consistency tokens.

A token is a Postgres WAL position (an LSN, written as Postgres writes it,
``16/B374D848``). A call that wrote answers with one in its trailing metadata
under :data:`TOKEN_KEY`: the primary's WAL insert position after its commit,
so at or past the commit record. A read that sends a token back under the same
key is served by a replica only once that replica has replayed up to it
(``pg_last_wal_replay_lsn()``), otherwise by the primary. The gateway keeps
the newest token per API key and adds it to that caller's later calls, so a
grpcurl user who writes and then reads never sees the older value.

The token of the call being served lives in a context variable: the server
sets what the caller sent (:func:`begin_call`) and reads back what the call's
writes recorded (:func:`note_commit`) to put in the trailing metadata.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.api.errors import FieldViolation, invalid_argument

__all__ = [
    "TOKEN_KEY",
    "CallTokens",
    "begin_call",
    "format_lsn",
    "note_commit",
    "parse_lsn",
    "required_lsn",
    "token_from_metadata",
]

# Not under x-strata-: the gateway strips those from callers, and a caller may
# pass a token it got from a write (it can only make its own reads fresher).
TOKEN_KEY = "strata-consistency-token"
_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


@dataclass(slots=True)
class CallTokens:
    """One call's consistency: the LSN its reads must see, the newest LSN its writes reached."""

    required: int = 0
    committed: int = 0


_current: contextvars.ContextVar[CallTokens | None] = contextvars.ContextVar(
    "strata_consistency", default=None
)


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` as an integer; ValueError for anything else."""
    match = _LSN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """An LSN integer in Postgres's own notation."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def token_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> int:
    """The newest token in ``metadata`` (0 when none); INVALID_ARGUMENT for a malformed one."""
    newest = 0
    for key, value in metadata or ():
        if key != TOKEN_KEY:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        try:
            newest = max(newest, parse_lsn(text))
        except ValueError:
            problem = f"{text[:40]!r} is not a consistency token (a WAL position like 0/16B3748)"
            raise invalid_argument([FieldViolation(TOKEN_KEY, problem)]) from None
    return newest


def begin_call(metadata: Iterable[tuple[str, Any]] | None) -> CallTokens:
    """Start tracking the current call: what it requires, from its metadata."""
    tokens = CallTokens(required=token_from_metadata(metadata))
    _current.set(tokens)
    return tokens


def required_lsn() -> int:
    """The WAL position the current call's reads must see (0: any replica will do)."""
    tokens = _current.get()
    return 0 if tokens is None else max(tokens.required, tokens.committed)


def note_commit(lsn: int) -> None:
    """Record that the current call's writes reached ``lsn`` (reads later in the call see them too)."""
    tokens = _current.get()
    if tokens is not None and lsn > tokens.committed:
        tokens.committed = lsn

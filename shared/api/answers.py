"""Answers that fit one message: rows counted by Postgres before they are sent.

A page of 1,000 rows of 1 MiB values, read whole and then refused by gRPC's
message limit, would cost a gigabyte of the service's memory and answer
nothing: at every retry, for ever. So a read that may return large rows asks
Postgres to count: :func:`cut_by_bytes` wraps the read's SQL so that only the
rows whose running total of bytes stays within the budget are sent, plus the
first row past it, which tells the caller the answer was cut
(:func:`split_at_budget`). Postgres learns a ``bytea`` or ``text`` value's size
without reading it (``octet_length`` reads the TOAST header), so the rows past
the budget cost neither a read nor a transfer.

A page cut this way ends early with a ``next_page_token`` (like a page ended
by its size); a read that cannot be paged (a search, a batch get) answers
RESOURCE_EXHAUSTED ``RESPONSE_TOO_LARGE`` (:func:`too_large`). Batch gets
served from the cache count their hits as they come and give the database
read of their misses what is left (``RevisionedCache.load_many``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import asyncpg

from shared.api.errors import Code, StrataError

__all__ = [
    "ROW_OVERHEAD_BYTES",
    "OverBudget",
    "answer_budget",
    "cut_by_bytes",
    "page_rows",
    "split_at_budget",
    "too_large",
]

_Row = TypeVar("_Row")
# What one row adds to an answer beyond its counted columns: ids, numbers,
# timestamps and protobuf framing.
ROW_OVERHEAD_BYTES = 64
# Kept free under the message limit for the answer's header, page token and framing.
_HEADROOM_BYTES = 64 * 1024


class OverBudget(Exception):
    """A read found more bytes than its answer may hold; raised as soon as that is known."""


def answer_budget(max_message_bytes: int) -> int:
    """The bytes an answer's rows may take under ``STRATA_MAX_MESSAGE_BYTES``."""
    return max(1, max_message_bytes - _HEADROOM_BYTES)


def cut_by_bytes(sql: str, order_by: str, budget: str | None) -> str:
    """``sql``, whose rows carry ``answer_bytes`` (what each adds to the answer), cut by bytes.

    The result keeps ``sql``'s rows in ``order_by`` (given in terms of its
    output columns) while their running total of ``answer_bytes`` stays within
    ``budget`` (a bind parameter, e.g. ``$4``), and the first row past it;
    each row gains ``answer_running``, that total up to and including it.
    ``budget`` None: the rows are known to fit (their size follows from the
    request), and come whole, in ``order_by``, without the window.
    """
    if budget is None:
        return f"SELECT * FROM ({sql}) answer_rows ORDER BY {order_by}"
    return (
        "SELECT * FROM (SELECT *, sum(answer_bytes) OVER "
        f"(ORDER BY {order_by} ROWS UNBOUNDED PRECEDING) AS answer_running FROM ({sql}) answer_rows) cut "
        f"WHERE answer_running - answer_bytes <= {budget} ORDER BY {order_by}"
    )


def split_at_budget(
    rows: Sequence[asyncpg.Record], budget: int | None
) -> tuple[list[asyncpg.Record], asyncpg.Record | None]:
    """The rows of a :func:`cut_by_bytes` read that fit ``budget``, and the first that did not
    (None: the answer is whole). ``budget`` None: the read was not cut, and every row fits."""
    if budget is None:
        return list(rows), None
    fit = [row for row in rows if row["answer_running"] <= budget]
    return fit, rows[len(fit)] if len(fit) < len(rows) else None


def page_rows(
    rows: Sequence[_Row], cut: bool, size: int, *, budget: int, item: str
) -> tuple[Sequence[_Row], bool]:
    """A page of at most ``size`` of ``rows`` (read as ``size`` + 1, then cut by bytes: ``cut``), and
    whether another page follows. A page ends at ``size`` items or where the next would pass the
    message limit; when the first ``item`` alone would, RESOURCE_EXHAUSTED on ``page_size``."""
    if cut and not rows:
        raise too_large(budget, "page_size", f"one {item} is larger than the message limit")
    return rows[:size], cut or len(rows) > size


def too_large(budget: int, field: str, remedy: str) -> StrataError:
    """RESOURCE_EXHAUSTED ``RESPONSE_TOO_LARGE``: the answer would pass ``budget`` at ``field``."""
    return StrataError(
        Code.RESOURCE_EXHAUSTED,
        "RESPONSE_TOO_LARGE",
        f"the answer would pass the message limit ({budget} bytes for its items) at {field}: {remedy}",
        metadata={"field": field, "limit": str(budget)},
    )

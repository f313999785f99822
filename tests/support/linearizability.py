"""A linearizability checker for single-key histories of Strata KV (Wing & Gong search, Lowe/Porcupine memo).

A history is a list of :class:`Operation`: who called what on which key,
when the call started and when its answer came (both from one monotonic
clock), and what the answer was. It is linearizable when every operation can
be given one instant between its call and its return such that, taken in that
order, each answer is the one a single copy of the store would give
(Herlihy & Wing). The checker searches for such an order the way etcd's
robustness tests do with Porcupine:

* **Partitioned by key.** Every operation touches one key, and
  linearizability is compositional (P-compositionality), so each key's
  sub-history is checked alone.
* **Depth-first search with memoisation** (Wing & Gong, with Lowe's cache):
  a node is (the set of operations linearized so far, as a bit mask; the
  model state). An operation may come next when it was called before every
  not-yet-linearized definite operation returned. A (mask, state) pair seen
  before is never explored again.
* **Unknown outcomes.** A write whose answer never came (DEADLINE_EXCEEDED,
  UNAVAILABLE, a dropped connection) may or may not have taken effect, at any
  instant after its call. It is given no return time: it may be linearized
  anywhere after its call (and then it took effect) or never (it did not).
  A read whose answer never came tells nothing and is dropped.

The model is KvService's (kv.proto), for one key:

* A live key has value, content_type, create_revision, mod_revision, version.
* Put writes at a new store revision ``r`` (``header.revision``), greater than
  the revision of every write linearized before it (the store has one revision
  counter, handed out in commit order; other keys' writes take revisions too,
  so only the order is known, not the numbers). ``create_revision`` is ``r``
  when the key did not exist, else unchanged; ``version`` is 1 or +1.
  ``if_revision`` set: write only if the live mod_revision (0 when absent)
  equals it, else ABORTED with ``current_revision`` in the ErrorInfo.
* Delete of one key: ``deleted`` = 1 at a new revision when the key was live,
  else 0 and no revision; ``if_revision`` as for Put.
* Get: the live entry, or NOT_FOUND.
* ``return_previous`` answers are compared with the state before the write.

A write of unknown outcome that took effect has an unknown revision; it is a
symbol that a later answer (a Get, a previous value, a failed compare's
current_revision) binds, within bounds: above every known revision
linearized before the write, below every known one after it. Order between
two still-unknown revisions is not checked, and a failed compare against an
unbound revision is accepted (it only says the revision differs); both only
make the checker more lenient, never report a false violation.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple, TypeAlias

__all__ = [
    "Aborted",
    "CheckResult",
    "Delete",
    "Deleted",
    "Entry",
    "Found",
    "Get",
    "Input",
    "KeyResult",
    "Operation",
    "Output",
    "Put",
    "Verdict",
    "Written",
    "check",
]


# -- what the history records -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A live key as KeyValue reports it (its value included)."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    content_type: str = ""


@dataclass(frozen=True, slots=True)
class Get:
    """GetRequest for the operation's key."""


@dataclass(frozen=True, slots=True)
class Put:
    """PutRequest: ``if_revision`` is kv.proto's compare-and-set (0: only if absent).

    ``if_value`` compares the live value instead (a generic register CAS, not
    offered by KvService; kept so other register histories can be checked).
    """

    value: bytes
    content_type: str = ""
    if_revision: int | None = None
    if_value: bytes | None = None
    return_previous: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """DeleteRequest for the operation's key (never a prefix)."""

    if_revision: int | None = None
    return_previous: bool = False


Input: TypeAlias = Get | Put | Delete


@dataclass(frozen=True, slots=True)
class Found:
    """A Get's answer: the entry, or None for NOT_FOUND."""

    entry: Entry | None


@dataclass(frozen=True, slots=True)
class Written:
    """A Put's OK answer: header.revision (= kv.mod_revision), kv.create_revision, kv.version.

    ``previous`` is the PutResponse.previous (None: unset); compared only when
    the input asked for it.
    """

    revision: int
    create_revision: int
    version: int
    previous: Entry | None = None


@dataclass(frozen=True, slots=True)
class Deleted:
    """A Delete's OK answer: ``deleted`` (0 or 1) and header.revision (its revision when 1).

    ``revision`` None: not known (the delete's place in the revision order is
    then not checked). ``previous`` is the removed entry (None: none);
    compared only when asked for.
    """

    deleted: int
    revision: int | None
    previous: Entry | None = None


@dataclass(frozen=True, slots=True)
class Aborted:
    """ABORTED / REVISION_MISMATCH (or a failed if_value): nothing written.

    ``current_revision`` is the ErrorInfo's (0: absent); None when not known.
    """

    current_revision: int | None = None


Output: TypeAlias = Found | Written | Deleted | Aborted


@dataclass(frozen=True, slots=True)
class Operation:
    """One call: ``output`` None means the outcome is unknown (``ret`` is then ignored)."""

    key: str
    input: Input
    output: Output | None
    call: float
    ret: float
    client: int = 0

    def __post_init__(self) -> None:
        allowed: dict[type, tuple[type, ...]] = {
            Get: (Found,),
            Put: (Written, Aborted),
            Delete: (Deleted, Aborted),
        }
        if self.output is not None and not isinstance(self.output, allowed[type(self.input)]):
            raise ValueError(f"{type(self.input).__name__} cannot answer {self.output!r}")
        if self.output is not None and self.ret < self.call:
            raise ValueError(f"returned ({self.ret}) before it was called ({self.call})")

    @property
    def known(self) -> bool:
        return self.output is not None

    def describe(self) -> str:
        span = f"[{self.call:.6f}, {'?' if self.output is None else f'{self.ret:.6f}'}]"
        answer = "unknown outcome" if self.output is None else repr(self.output)
        return f"client {self.client} {span} {self.input!r} -> {answer}"


# -- the model ----------------------------------------------------------------

# Revisions in the state: >= 1 known, < 0 a symbol (the unknown revision of
# the write of unknown outcome at index -sym - 1 of the key's history).


class _Live(NamedTuple):
    value: bytes
    content_type: str
    create: int
    mod: int
    version: int


class _Bound(NamedTuple):
    symbol: int
    lo: int  # the symbol's revision is > lo
    hi: float  # ... and < hi


class _State(NamedTuple):
    live: _Live | None
    floor: int  # the highest known revision of the writes linearized so far
    bounds: tuple[_Bound, ...]  # for the symbols ``live`` refers to


def _bind(state: _State, held: int, observed: int) -> _State | None:
    """``state`` knowing that the revision it holds as ``held`` is ``observed``; None if it cannot be."""
    if held >= 0:
        return state if held == observed else None
    bound = next(b for b in state.bounds if b.symbol == held)
    if not bound.lo < observed < bound.hi:
        return None
    live = state.live
    assert live is not None
    live = live._replace(
        create=observed if live.create == held else live.create,
        mod=observed if live.mod == held else live.mod,
    )
    bounds = tuple(b for b in state.bounds if b.symbol != held)
    return _State(live, max(state.floor, observed), bounds)


def _match(state: _State, entry: Entry | None) -> _State | None:
    """``state`` if its live key can be ``entry`` (binding symbols); None otherwise."""
    live = state.live
    if live is None or entry is None:
        return state if live is None and entry is None else None
    if (live.value, live.content_type, live.version) != (entry.value, entry.content_type, entry.version):
        return None
    bound = _bind(state, live.create, entry.create_revision)
    if bound is None:
        return None
    assert bound.live is not None
    return _bind(bound, bound.live.mod, entry.mod_revision)


def _gc(live: _Live | None, floor: int, bounds: Iterable[_Bound]) -> _State:
    """A state keeping only the bounds of symbols ``live`` still refers to."""
    used = set() if live is None else {live.create, live.mod}
    return _State(live, floor, tuple(b for b in bounds if b.symbol in used))


def _compare(state: _State, op: Put | Delete, wanted: bool | None) -> tuple[_State, bool] | None:
    """Whether the compare of ``op`` holds in ``state``: (state, holds), binding what it can.

    ``wanted`` True/False: the answer says it held/failed, and a symbolic
    revision is bound (or accepted) accordingly; None: the answer is unknown and
    the compare is taken to hold (a write of unknown outcome that failed its
    compare is the same as one that never happened).
    """
    live = state.live
    if isinstance(op, Put) and op.if_value is not None:
        holds = live is not None and live.value == op.if_value
        if wanted is not None and holds != wanted:
            return None
        return (state, holds)
    if op.if_revision is None:
        return (state, True) if wanted is not False else None
    current = 0 if live is None else live.mod
    if current < 0:  # an unknown revision
        if wanted is False:
            return (state, False)  # lenient: it only says the symbol differs from if_revision
        bound = _bind(state, current, op.if_revision)
        return None if bound is None else (bound, True)
    holds = current == op.if_revision
    if wanted is not None and holds != wanted:
        return None
    return (state, holds)


def _step(state: _State, index: int, op: Operation) -> _State | None:
    """The state after linearizing ``op`` (history index ``index``) in ``state``; None if it cannot be."""
    inp, out = op.input, op.output
    if isinstance(inp, Get):
        assert isinstance(out, Found)
        return _match(state, out.entry)
    if isinstance(out, Aborted):
        if isinstance(inp, Delete) and inp.if_revision is None:
            return None
        compared = _compare(state, inp, wanted=False)
        if compared is None:
            return None
        state = compared[0]
        if out.current_revision is None:
            return state
        if isinstance(inp, Delete) or inp.if_value is None:
            if out.current_revision == inp.if_revision:
                return None  # a compare that failed against the revision it wanted
        if state.live is None:
            return state if out.current_revision == 0 else None
        return _bind(state, state.live.mod, out.current_revision)
    compared = _compare(state, inp, wanted=None if out is None else True)
    if compared is None or not compared[1]:
        return None
    state = compared[0]
    live = state.live
    if isinstance(inp, Put):
        if out is None:  # took effect, at an unknown revision
            symbol = -index - 1
            new = _Live(
                inp.value,
                inp.content_type,
                live.create if live else symbol,
                symbol,
                live.version + 1 if live else 1,
            )
            return _gc(new, state.floor, (*state.bounds, _Bound(symbol, state.floor, math.inf)))
        assert isinstance(out, Written)
        if inp.return_previous:
            matched = _match(state, out.previous)
            if matched is None:
                return None
            state, live = matched, matched.live
        if live is None:
            if (out.create_revision, out.version) != (out.revision, 1) or out.revision <= state.floor:
                return None
            new = _Live(inp.value, inp.content_type, out.revision, out.revision, 1)
            return _State(new, out.revision, ())
        if out.version != live.version + 1:
            return None
        bound = _bind(state, live.create, out.create_revision)
        # Checked after binding: a revision learnt here also precedes this write.
        if bound is None or out.revision <= bound.floor:
            return None
        new = _Live(inp.value, inp.content_type, out.create_revision, out.revision, out.version)
        # A symbol still referred to (the create revision) was written before this one.
        bounds = (b._replace(hi=min(b.hi, out.revision)) for b in bound.bounds)
        return _gc(new, out.revision, bounds)
    # Delete of one key.
    if out is None:
        return _State(None, state.floor, ()) if live is not None else None
    assert isinstance(out, Deleted)
    if out.deleted == 0:
        return state if live is None and not (inp.return_previous and out.previous) else None
    if out.deleted != 1 or live is None:
        return None
    if inp.return_previous:
        matched = _match(state, out.previous)
        if matched is None:
            return None
        state = matched
    if out.revision is None:
        return _State(None, state.floor, ())
    return _State(None, out.revision, ()) if out.revision > state.floor else None


# -- the search ---------------------------------------------------------------


class Verdict(Enum):
    """The outcome for one key."""

    LINEARIZABLE = "linearizable"
    VIOLATION = "violation"
    UNKNOWN = "unknown"  # the search ran out of its state budget


@dataclass(frozen=True, slots=True)
class KeyResult:
    """One key's verdict.

    ``linearized`` is a full linearization when LINEARIZABLE, otherwise the
    longest prefix of one the search found; ``stuck`` lists the definite
    operations that could come next after it and could not be linearized there.
    """

    key: str
    verdict: Verdict
    operations: tuple[Operation, ...]
    linearized: tuple[Operation, ...]
    stuck: tuple[Operation, ...]
    explored: int

    def describe(self, limit: int = 12) -> str:
        lines = [
            f"key {self.key!r}: {self.verdict.value} ({len(self.operations)} ops, {self.explored} states)"
        ]
        if self.verdict is not Verdict.LINEARIZABLE:
            tail = self.linearized[-limit:]
            lines.append(f"  longest linearizable prefix: {len(self.linearized)} ops; its last {len(tail)}:")
            lines.extend(f"    {op.describe()}" for op in tail)
            lines.append("  then none of these could come next:")
            lines.extend(f"    {op.describe()}" for op in self.stuck[:limit])
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Every key's verdict, and how long the check took."""

    keys: dict[str, KeyResult] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.verdict is Verdict.LINEARIZABLE for r in self.keys.values())

    @property
    def violations(self) -> list[KeyResult]:
        return [r for r in self.keys.values() if r.verdict is Verdict.VIOLATION]

    def describe(self) -> str:
        bad = [r for r in self.keys.values() if r.verdict is not Verdict.LINEARIZABLE]
        if not bad:
            return f"linearizable: {len(self.keys)} keys, {sum(len(r.operations) for r in self.keys.values())} ops"
        return "\n".join(r.describe() for r in bad)


def check(
    history: Iterable[Operation],
    *,
    initial: Mapping[str, Entry] | None = None,
    max_states: int = 2_000_000,
) -> CheckResult:
    """Check ``history`` key by key; ``initial`` holds keys live before it (others start absent).

    ``max_states`` bounds the search per key; beyond it the key's verdict is UNKNOWN.
    """
    started = time.perf_counter()
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        if op.output is None and isinstance(op.input, Get):
            continue  # an unanswered read tells nothing
        by_key[op.key].append(op)
    results = {key: _check_key(key, ops, (initial or {}).get(key), max_states) for key, ops in by_key.items()}
    return CheckResult(results, time.perf_counter() - started)


class _Path(NamedTuple):
    op: int
    parent: _Path | None


def _unwind(path: _Path | None, ops: Sequence[Operation]) -> tuple[Operation, ...]:
    out: list[Operation] = []
    while path is not None:
        out.append(ops[path.op])
        path = path.parent
    return tuple(reversed(out))


def _check_key(key: str, history: Sequence[Operation], initial: Entry | None, max_states: int) -> KeyResult:
    ops = sorted(history, key=lambda o: o.call)
    n = len(ops)
    calls = [o.call for o in ops]
    rets = [o.ret if o.known else math.inf for o in ops]
    definite = sum(1 << i for i, o in enumerate(ops) if o.known)
    full = (1 << n) - 1
    start = _State(None, 0, ())
    if initial is not None:
        live = _Live(
            initial.value,
            initial.content_type,
            initial.create_revision,
            initial.mod_revision,
            initial.version,
        )
        start = _State(live, initial.mod_revision, ())

    seen: set[tuple[int, _State]] = set()
    stack: list[tuple[int, _State, _Path | None, int]] = [(0, start, None, 0)]
    deepest: tuple[int, int, _Path | None] = (-1, 0, None)  # (depth, mask, path)
    while stack:
        mask, state, path, depth = stack.pop()
        if (mask, state) in seen:
            continue
        seen.add((mask, state))
        if mask & definite == definite:
            return KeyResult(key, Verdict.LINEARIZABLE, tuple(ops), _unwind(path, ops), (), len(seen))
        if depth > deepest[0]:
            deepest = (depth, mask, path)
        if len(seen) >= max_states:
            return _failed(key, Verdict.UNKNOWN, ops, deepest, rets, definite, len(seen))
        # Candidates: not linearized, called no later than the earliest return among
        # the definite ones not linearized (ops are in call order, so the scan
        # stops at the first call after that return).
        rest = ~mask & full
        earliest = math.inf
        window: list[int] = []
        while rest:
            low = rest & -rest
            i = low.bit_length() - 1
            if calls[i] > earliest:
                break
            window.append(i)
            earliest = min(earliest, rets[i])
            rest ^= low
        # Popped in call order, definite ones first: a write of unknown outcome is
        # tried only when nothing else fits (usually a read that saw it).
        window.sort(key=lambda i: (definite >> i & 1, -i))
        for i in window:
            if calls[i] > earliest:
                continue
            after = _step(state, i, ops[i])
            if after is not None and (mask | 1 << i, after) not in seen:
                stack.append((mask | 1 << i, after, _Path(i, path), depth + 1))
    return _failed(key, Verdict.VIOLATION, ops, deepest, rets, definite, len(seen))


def _failed(
    key: str,
    verdict: Verdict,
    ops: Sequence[Operation],
    deepest: tuple[int, int, _Path | None],
    rets: Sequence[float],
    definite: int,
    explored: int,
) -> KeyResult:
    _, mask, path = deepest
    pending = [i for i in range(len(ops)) if not mask >> i & 1 and definite >> i & 1]
    earliest = min((rets[i] for i in pending), default=math.inf)
    stuck = tuple(ops[i] for i in pending if ops[i].call <= earliest)
    return KeyResult(key, verdict, tuple(ops), _unwind(path, ops), stuck, explored)

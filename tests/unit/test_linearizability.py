"""tests/support/linearizability.py: the checker accepts linearizable histories and names the key of a violation."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.linearizability import (
    Aborted,
    Delete,
    Deleted,
    Entry,
    Found,
    Get,
    Input,
    Operation,
    Output,
    Put,
    Verdict,
    Written,
    check,
)


def op(
    call: float, ret: float, inp: Input, out: Output | None, *, key: str = "k", client: int = 0
) -> Operation:
    return Operation(key, inp, out, call, ret, client)


def entry(value: bytes, create: int, mod: int, version: int) -> Entry:
    return Entry(value, create, mod, version)


def assert_linearizable(*ops: Operation) -> None:
    result = check(ops)
    assert result.ok, result.describe()


def assert_violation(*ops: Operation, key: str = "k") -> None:
    result = check(ops)
    assert not result.ok
    assert [r.key for r in result.violations] == [key], result.describe()


# -- sequential and concurrent basics ----------------------------------------


def test_a_sequential_put_get_cas_delete_history_is_linearizable():
    assert_linearizable(
        op(0, 1, Get(), Found(None)),
        op(2, 3, Put(b"a"), Written(revision=5, create_revision=5, version=1)),
        op(4, 5, Get(), Found(entry(b"a", 5, 5, 1))),
        op(6, 7, Put(b"b", if_revision=5), Written(revision=9, create_revision=5, version=2)),
        op(8, 9, Put(b"c", if_revision=5), Aborted(current_revision=9)),
        op(10, 11, Get(), Found(entry(b"b", 5, 9, 2))),
        op(12, 13, Delete(if_revision=9, return_previous=True), Deleted(1, 12, entry(b"b", 5, 9, 2))),
        op(14, 15, Get(), Found(None)),
        op(16, 17, Delete(), Deleted(0, 12)),
        op(18, 19, Put(b"d", if_revision=0), Written(revision=20, create_revision=20, version=1)),
    )


def test_a_read_overlapping_a_write_may_see_either_value():
    put = op(0, 10, Put(b"new"), Written(revision=3, create_revision=3, version=1), client=1)
    assert_linearizable(put, op(1, 2, Get(), Found(None)))
    assert_linearizable(put, op(1, 2, Get(), Found(entry(b"new", 3, 3, 1))))


def test_reads_may_not_go_back_once_one_saw_the_overlapping_write():
    # Both reads overlap the put, but the first saw it: the later one cannot miss it.
    assert_violation(
        op(0, 10, Put(b"new"), Written(revision=3, create_revision=3, version=1), client=1),
        op(1, 2, Get(), Found(entry(b"new", 3, 3, 1))),
        op(3, 4, Get(), Found(None)),
    )


def test_a_stale_read_after_an_acknowledged_write_is_a_violation():
    assert_violation(
        op(0, 1, Put(b"old"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"new"), Written(revision=2, create_revision=1, version=2), client=1),
        op(4, 5, Get(), Found(entry(b"old", 1, 1, 1)), client=2),
    )


def test_revisions_must_grow_in_real_time_order():
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=10, create_revision=10, version=1)),
        op(2, 3, Put(b"b"), Written(revision=7, create_revision=10, version=2)),
    )


def test_wrong_version_or_create_revision_is_a_violation():
    first = op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1))
    assert_violation(first, op(2, 3, Put(b"b"), Written(revision=2, create_revision=1, version=3)))
    assert_violation(first, op(2, 3, Put(b"b"), Written(revision=2, create_revision=2, version=2)))
    assert_violation(first, op(2, 3, Get(), Found(entry(b"a", 1, 1, 2))))


def test_delete_answers_must_match_the_state():
    assert_violation(op(0, 1, Delete(), Deleted(1, 4)))  # nothing was there
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Delete(), Deleted(0, 1)),  # the key was live
    )
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Delete(return_previous=True), Deleted(1, 2, entry(b"zzz", 1, 1, 1))),
    )


def test_a_delete_must_take_a_revision_between_the_writes_around_it():
    created = op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1))
    recreated = op(4, 5, Put(b"b"), Written(revision=9, create_revision=9, version=1))
    assert_linearizable(created, op(2, 3, Delete(), Deleted(1, 5)), recreated)
    # The put that re-created the key came after the delete, so it cannot share or precede its revision.
    assert_violation(created, op(2, 4.5, Delete(), Deleted(1, 9)), recreated)
    # A delete whose revision is not known is only placed by real time and the state.
    assert_linearizable(created, op(2, 4.5, Delete(), Deleted(1, None)), recreated)
    assert_violation(
        created, op(2, 3, Delete(), Deleted(1, None)), op(4, 5, Get(), Found(entry(b"a", 1, 1, 1)))
    )


# -- compare-and-set ----------------------------------------------------------


def test_two_successful_cas_on_the_same_expected_revision_is_a_violation():
    created = op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1))
    assert_violation(
        created,
        op(2, 5, Put(b"x", if_revision=1), Written(revision=2, create_revision=1, version=2), client=1),
        op(2, 5, Put(b"y", if_revision=1), Written(revision=3, create_revision=1, version=3), client=2),
    )


def test_one_winner_and_one_aborted_cas_on_the_same_revision_is_linearizable():
    assert_linearizable(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 5, Put(b"x", if_revision=1), Written(revision=2, create_revision=1, version=2), client=1),
        op(2, 5, Put(b"y", if_revision=1), Aborted(current_revision=2), client=2),
        op(6, 7, Get(), Found(entry(b"x", 1, 2, 2))),
    )


def test_a_lost_cas_is_a_violation():
    # The CAS was acknowledged, yet a later read still sees the value it replaced.
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b", if_revision=1), Written(revision=2, create_revision=1, version=2)),
        op(4, 5, Get(), Found(entry(b"a", 1, 1, 1)), client=1),
    )


def test_a_cas_that_failed_although_the_revision_matched_is_a_violation():
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b", if_revision=1), Aborted(current_revision=None)),
    )


def test_a_failed_cas_must_report_the_current_revision():
    created = op(0, 1, Put(b"a"), Written(revision=4, create_revision=4, version=1))
    assert_linearizable(created, op(2, 3, Put(b"b", if_revision=3), Aborted(current_revision=4)))
    assert_violation(created, op(2, 3, Put(b"b", if_revision=3), Aborted(current_revision=7)))
    assert_linearizable(op(0, 1, Put(b"b", if_revision=3), Aborted(current_revision=0)))


def test_cas_delete_and_create_only_if_absent():
    assert_linearizable(
        op(0, 1, Put(b"a", if_revision=0), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b", if_revision=0), Aborted(current_revision=1)),
        op(4, 5, Delete(if_revision=2), Aborted(current_revision=1)),
        op(6, 7, Delete(if_revision=1), Deleted(1, 3)),
    )
    assert_violation(
        op(0, 1, Put(b"a", if_revision=0), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b", if_revision=0), Written(revision=2, create_revision=2, version=1)),
    )


def test_compare_by_value():
    created = op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1))
    assert_linearizable(
        created, op(2, 3, Put(b"b", if_value=b"a"), Written(revision=2, create_revision=1, version=2))
    )
    assert_violation(
        created, op(2, 3, Put(b"b", if_value=b"zz"), Written(revision=2, create_revision=1, version=2))
    )
    assert_linearizable(created, op(2, 3, Put(b"b", if_value=b"zz"), Aborted()))


# -- unknown outcomes -----------------------------------------------------------


def test_an_unknown_write_may_have_taken_effect():
    assert_linearizable(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b"), None),  # timed out
        op(4, 5, Get(), Found(entry(b"b", 1, 6, 2)), client=1),
        op(6, 7, Put(b"c", if_revision=6), Written(revision=8, create_revision=1, version=3), client=1),
    )


def test_an_unknown_write_may_not_have_taken_effect():
    assert_linearizable(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b"), None),
        op(4, 5, Get(), Found(entry(b"a", 1, 1, 1)), client=1),
        op(6, 7, Put(b"c", if_revision=1), Written(revision=8, create_revision=1, version=2), client=1),
    )


def test_an_unknown_write_may_take_effect_long_after_its_caller_gave_up():
    assert_linearizable(
        op(0, 1, Put(b"a"), None),
        op(2, 3, Get(), Found(None), client=1),
        op(4, 5, Get(), Found(entry(b"a", 4, 4, 1)), client=1),
    )


def test_an_unknown_write_takes_effect_once_at_most():
    # Seen, then gone with no delete, then seen again: no single instant explains it.
    assert_violation(
        op(0, 1, Put(b"a"), None),
        op(2, 3, Get(), Found(entry(b"a", 4, 4, 1)), client=1),
        op(4, 5, Get(), Found(None), client=1),
    )


def test_an_unknown_revision_is_bounded_by_the_known_ones_around_it():
    first = op(0, 1, Put(b"a"), Written(revision=5, create_revision=5, version=1))
    unknown = op(2, 3, Put(b"b"), None)
    # Seen at a revision below one acknowledged before it was even called.
    assert_violation(first, unknown, op(4, 5, Get(), Found(entry(b"b", 5, 4, 2)), client=1))
    # The create revision it left behind must precede the write that replaced the value.
    assert_violation(
        op(0, 1, Put(b"a"), None),
        op(2, 3, Put(b"b"), Written(revision=7, create_revision=9, version=2), client=1),
    )
    assert_linearizable(
        op(0, 1, Put(b"a"), None),
        op(2, 3, Put(b"b"), Written(revision=7, create_revision=6, version=2), client=1),
    )


def test_an_unknown_cas_applies_only_if_its_compare_held():
    assert_violation(
        op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1)),
        op(2, 3, Put(b"b", if_revision=99), None),
        op(4, 5, Get(), Found(entry(b"b", 1, 6, 2)), client=1),
    )


def test_an_unknown_delete_may_have_removed_the_key():
    created = op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1))
    assert_linearizable(created, op(2, 3, Delete(), None), op(4, 5, Get(), Found(None), client=1))
    assert_linearizable(
        created, op(2, 3, Delete(), None), op(4, 5, Get(), Found(entry(b"a", 1, 1, 1)), client=1)
    )


def test_an_unanswered_read_is_ignored():
    assert_linearizable(op(0, 1, Get(), None), op(2, 3, Get(), Found(None)))


# -- keys, budget, reporting ----------------------------------------------------


def test_keys_are_checked_apart_and_the_violating_key_is_named():
    result = check(
        [
            op(0, 1, Put(b"a"), Written(revision=1, create_revision=1, version=1), key="good"),
            op(0, 1, Put(b"a"), Written(revision=2, create_revision=2, version=1), key="bad"),
            op(2, 3, Get(), Found(entry(b"a", 1, 1, 1)), key="good"),
            op(2, 3, Get(), Found(None), key="bad"),
        ]
    )
    assert [r.key for r in result.violations] == ["bad"]
    assert result.keys["good"].verdict is Verdict.LINEARIZABLE
    assert len(result.keys["good"].linearized) == 2
    bad = result.keys["bad"]
    assert [o.input for o in bad.linearized] == [Put(b"a")]
    assert [o.input for o in bad.stuck] == [Get()]
    assert "key 'bad': violation" in result.describe()


def test_keys_live_before_the_history_are_given_as_initial_entries():
    history = [op(0, 1, Get(), Found(entry(b"x", 3, 3, 1)))]
    assert not check(history).ok
    assert check(history, initial={"k": entry(b"x", 3, 3, 1)}).ok


def test_a_search_over_budget_is_unknown_not_a_verdict():
    ops = [op(i, 100, Get(), Found(None), client=i) for i in range(10)] + [
        op(101, 102, Get(), Found(entry(b"x", 1, 1, 1)))
    ]
    result = check(ops, max_states=50)
    assert result.keys["k"].verdict is Verdict.UNKNOWN and not result.ok


def test_impossible_answers_are_refused_when_recorded():
    with pytest.raises(ValueError, match="cannot answer"):
        op(0, 1, Get(), Written(revision=1, create_revision=1, version=1))
    with pytest.raises(ValueError, match="before it was called"):
        op(2, 1, Get(), Found(None))


# -- generated histories ------------------------------------------------------


@dataclass
class _Live:
    value: bytes
    create: int
    mod: int
    version: int


class _AtomicKv:
    """A plain single-copy KV, written apart from the checker's model, to generate true histories."""

    def __init__(self) -> None:
        self.keys: dict[str, _Live] = {}
        self.revision = 0

    def apply(self, key: str, inp: Input) -> Output:
        live = self.keys.get(key)
        snapshot = None if live is None else entry(live.value, live.create, live.mod, live.version)
        if isinstance(inp, Get):
            return Found(snapshot)
        current = 0 if live is None else live.mod
        if inp.if_revision is not None and inp.if_revision != current:
            return Aborted(current)
        if isinstance(inp, Put):
            self.revision += 1
            if live is None:
                self.keys[key] = _Live(inp.value, self.revision, self.revision, 1)
            else:
                live.value, live.mod, live.version = inp.value, self.revision, live.version + 1
            now = self.keys[key]
            return Written(self.revision, now.create, now.version, snapshot if inp.return_previous else None)
        if live is None:
            return Deleted(0, self.revision)
        self.revision += 1
        del self.keys[key]
        return Deleted(1, self.revision, snapshot if inp.return_previous else None)


_inputs = st.one_of(
    st.just(Get()),
    st.builds(
        Put,
        value=st.sampled_from([b"a", b"b", b"c"]),
        if_revision=st.none() | st.integers(0, 8),
        return_previous=st.booleans(),
    ),
    st.builds(Delete, if_revision=st.none() | st.integers(0, 8), return_previous=st.booleans()),
)
_calls = st.tuples(
    st.integers(0, 3),  # client
    st.sampled_from(["x", "y"]),  # key
    _inputs,
    st.floats(0.0, 3.0),  # idle time before the call
    st.floats(0.1, 5.0),  # duration
    st.floats(0.0, 1.0),  # where in the call it takes effect
    st.sampled_from(["answered", "answered", "answered", "lost-applied", "lost-dropped"]),
)


def _simulate(calls: list[tuple[int, str, Input, float, float, float, str]]) -> list[Operation]:
    """Run ``calls`` against :class:`_AtomicKv`, each taking effect at one instant inside its call."""
    clock = [0.0] * 4
    planned = []
    for client, key, inp, idle, duration, at, fate in calls:
        start = clock[client] + idle
        clock[client] = start + duration
        if fate == "lost-dropped" and isinstance(inp, Get):
            fate = "answered"
        planned.append((start + at * duration, client, key, inp, start, start + duration, fate))
    store = _AtomicKv()
    history = []
    for _, client, key, inp, start, end, fate in sorted(planned, key=lambda p: p[0]):
        # A lost call either took effect (possibly after its caller gave up) or never did.
        output = None if fate == "lost-dropped" else store.apply(key, inp)
        if fate != "answered":
            output = None
        history.append(Operation(key, inp, output, start, end, client))
    return history


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_calls, max_size=40))
def test_every_history_of_an_atomic_store_is_linearizable(calls):
    result = check(_simulate(calls))
    assert result.ok, result.describe()


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(_calls, min_size=1, max_size=30), st.data())
def test_a_read_of_a_value_never_written_is_always_caught(calls, data):
    history = _simulate(calls)
    reads = [i for i, o in enumerate(history) if isinstance(o.output, Found)]
    if not reads:
        history.append(Operation("x", Get(), Found(None), 1000.0, 1001.0))
        reads = [len(history) - 1]
    i = data.draw(st.sampled_from(reads))
    forged = Found(entry(b"never-written", 1, 999, 1))
    history[i] = Operation(history[i].key, Get(), forged, history[i].call, history[i].ret, history[i].client)
    result = check(history)
    assert [r.key for r in result.violations] == [history[i].key]


def test_a_long_concurrent_history_checks_quickly():
    rng = random.Random(7)
    calls = [
        (
            rng.randrange(4),
            rng.choice("xyz"),
            rng.choice([Get(), Put(bytes([rng.randrange(3)]), if_revision=rng.choice([None, 0, 5]))]),
            rng.random(),
            rng.uniform(0.1, 5),
            rng.random(),
            rng.choice(["answered"] * 30 + ["lost-applied", "lost-dropped"]),
        )
        for _ in range(2000)
    ]
    started = time.perf_counter()
    result = check(_simulate(calls))
    assert result.ok, result.describe()
    assert time.perf_counter() - started < 20

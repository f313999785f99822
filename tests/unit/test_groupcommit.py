"""GroupCommit with a scripted writer: batching, isolation of bad entries, callers giving up."""

from __future__ import annotations

import asyncio
import contextvars

import asyncpg
import pytest

from shared.cache.groupcommit import GroupCommit

CALLER = contextvars.ContextVar("caller", default="")


class Writer:
    """Records each batch; an entry "bad" fails its statement; each write takes a short while."""

    def __init__(self, delay: float = 0.01) -> None:
        self.batches: list[list[str]] = []
        self.contexts: list[str] = []
        self.delay = delay

    async def __call__(self, entries, timeout):
        self.batches.append(list(entries))
        self.contexts.append(CALLER.get())
        await asyncio.sleep(self.delay)
        if "bad" in entries:
            raise asyncpg.exceptions.CheckViolationError("bad entry")
        return [f"done {e}" for e in entries]


async def test_a_lone_write_goes_straight_through():
    writer = Writer()
    group = GroupCommit(writer)
    assert await group.submit("a", 1.0) == "done a"
    assert writer.batches == [["a"]]


async def test_writes_arriving_during_a_batch_share_the_next_one():
    writer = Writer()
    group = GroupCommit(writer)
    results = await asyncio.gather(*(group.submit(f"w{i}", 1.0) for i in range(50)))
    assert results == [f"done w{i}" for i in range(50)]
    # The first goes alone; the other 49 queued behind it and went together.
    assert writer.batches[0] == ["w0"] and writer.batches[1] == [f"w{i}" for i in range(1, 50)]
    assert (group.batches, group.entries) == (2, 50)


async def test_batches_are_capped():
    writer = Writer()
    group = GroupCommit(writer, max_entries=10)
    await asyncio.gather(*(group.submit(i, 1.0) for i in range(31)))
    assert [len(b) for b in writer.batches] == [1, 10, 10, 10]


async def test_a_bad_entry_fails_alone():
    writer = Writer()
    group = GroupCommit(writer)
    first = asyncio.create_task(group.submit("first", 1.0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(group.submit(e, 1.0)) for e in ("x", "bad", "y")]
    assert await first == "done first"
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert outcomes[0] == "done x" and outcomes[2] == "done y"
    assert isinstance(outcomes[1], asyncpg.exceptions.CheckViolationError)
    assert writer.batches[1:] == [["x", "bad", "y"], ["x"], ["bad"], ["y"]]


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_batch():
    writer = Writer(delay=0.05)
    group = GroupCommit(writer)
    leader = asyncio.create_task(group.submit("leader", 1.0))
    await asyncio.sleep(0)
    follower = asyncio.create_task(group.submit("follower", 1.0))
    await asyncio.sleep(0.01)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await follower == "done follower"
    await group.drain()
    assert writer.batches == [["leader"], ["follower"]]


async def test_a_batch_runs_in_its_first_callers_context():
    writer = Writer()
    group = GroupCommit(writer)

    async def call(name: str) -> str:
        CALLER.set(name)
        return await group.submit(name, 1.0)

    await asyncio.gather(call("one"), call("two"), call("three"))
    assert writer.contexts == ["one", "two"]


async def test_the_after_step_overlaps_the_next_write_and_precedes_the_answer():
    writer = Writer(delay=0.02)
    events: list[str] = []
    after_may_finish = asyncio.Event()

    both_started = asyncio.Event()

    async def after(entries, results):
        events.append(f"after {entries}")
        if len(events) == 2:
            both_started.set()
        await after_may_finish.wait()
        events.append(f"after done {entries}")

    group = GroupCommit(writer, after=after)
    first = asyncio.create_task(group.submit("a", 1.0))
    await asyncio.sleep(0)
    second = asyncio.create_task(group.submit("b", 1.0))
    # "a"'s after step is held open, yet "b" is written meanwhile.
    await asyncio.wait_for(both_started.wait(), 5)
    assert writer.batches == [["a"], ["b"]]
    assert not first.done() and not second.done()  # nobody hears back before their after step
    after_may_finish.set()
    assert await first == "done a" and await second == "done b"
    assert events[:2] == ["after ['a']", "after ['b']"]  # started in batch order
    assert sorted(events[2:]) == ["after done ['a']", "after done ['b']"]
    await group.drain()


async def test_a_failing_after_step_still_answers_the_writers():
    async def after(entries, results):
        raise RuntimeError("cache unreachable")

    group = GroupCommit(Writer(), after=after)
    assert await asyncio.gather(group.submit("a", 1.0), group.submit("b", 1.0)) == ["done a", "done b"]


async def test_entries_written_one_by_one_each_get_their_after_step():
    told: list[list[str]] = []

    async def after(entries, results):
        told.append(list(entries))

    group = GroupCommit(Writer(), after=after)
    first = asyncio.create_task(group.submit("first", 1.0))
    await asyncio.sleep(0)
    rest = await asyncio.gather(*(group.submit(e, 1.0) for e in ("x", "bad", "y")), return_exceptions=True)
    await first
    assert isinstance(rest[1], asyncpg.exceptions.CheckViolationError)
    assert told == [["first"], ["x"], ["y"]]

"""SingleFlight: callers of one key share one run of the work; cancelling one fails no other."""

from __future__ import annotations

import asyncio

import pytest

from shared.cache.singleflight import SingleFlight


class Work:
    """Counts its runs and finishes when released."""

    def __init__(self, result: object = "done") -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.result = result

    async def __call__(self) -> object:
        self.runs += 1
        await self.release.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def test_concurrent_callers_of_one_key_share_one_run() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    work, other = Work("a"), Work("b")
    callers = [asyncio.ensure_future(flights.do("k", work)) for _ in range(5)]
    elsewhere = asyncio.ensure_future(flights.do("j", other))
    await asyncio.sleep(0)
    assert flights.running("k") and flights.running("j")
    work.release.set()
    other.release.set()
    assert await asyncio.gather(*callers) == ["a"] * 5
    assert await elsewhere == "b"
    assert (work.runs, other.runs) == (1, 1)
    assert not flights.running("k")
    # Done: the next caller runs the work again.
    assert await flights.do("k", work) == "a" and work.runs == 2


async def test_a_cancelled_caller_stops_waiting_and_the_others_get_the_result() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    work = Work()
    first = asyncio.ensure_future(flights.do("k", work))
    second = asyncio.ensure_future(flights.do("k", work))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    work.release.set()
    assert await second == "done"
    assert work.runs == 1


async def test_the_works_exception_is_every_waiters() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    work = Work(LookupError("gone"))
    callers = [asyncio.ensure_future(flights.do("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    work.release.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, LookupError) for o in outcomes) and work.runs == 1
    assert not flights.running("k")

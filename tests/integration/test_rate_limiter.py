"""The gateway's rate limiter against a real Redis: exact for slow limits, granted in batches for fast ones."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from gateway.ratelimit import RateLimiter
from shared.api.errors import Code, StrataError
from shared.cache.redisclient import open_redis


class CountingLimiter(RateLimiter):
    """Counts the Redis round trips."""

    trips = 0

    async def _refill(self, key_id: str) -> None:
        self.trips += 1
        await super()._refill(key_id)


async def spend(limiter: RateLimiter, key: str, calls: int) -> tuple[int, list[StrataError]]:
    outcomes = await asyncio.gather(*(limiter.take(key) for _ in range(calls)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, StrataError)]
    assert all(o is None or isinstance(o, StrataError) for o in outcomes), outcomes
    return calls - len(refused), refused


async def test_a_slow_limit_is_exact_one_token_per_round_trip(redis_url):
    limiter = CountingLimiter(open_redis(redis_url), rate=5, burst=5)
    try:
        allowed, refused = await spend(limiter, uuid.uuid4().hex, 8)
    finally:
        await limiter.close()
    assert allowed == 5 and len(refused) == 3
    assert all(r.code == Code.RESOURCE_EXHAUSTED and r.reason == "RATE_LIMITED" for r in refused)
    assert limiter.trips >= 6  # every call asked Redis (the refusals share a trip or not)


async def test_a_fast_limit_spends_grants_locally_and_stays_global(redis_url):
    # 1,000/s with a burst of 50: grants of 50 (1,000 x 0.05 s).
    first = CountingLimiter(open_redis(redis_url), rate=1000, burst=50)
    second = CountingLimiter(open_redis(redis_url), rate=1000, burst=50)
    key = uuid.uuid4().hex
    started = time.monotonic()
    try:
        allowed_first, _ = await spend(first, key, 50)
        allowed_second, refused = await spend(second, key, 200)
    finally:
        await first.close()
        await second.close()
    elapsed = time.monotonic() - started
    assert allowed_first == 50 and first.trips == 1, "one round trip for fifty calls"
    # The bucket is shared: together the replicas got the burst plus what refilled meanwhile.
    assert refused
    assert allowed_first + allowed_second <= 50 + 1000 * elapsed + 1


async def test_a_grant_left_unused_expires(redis_url):
    limiter = CountingLimiter(open_redis(redis_url), rate=1000, burst=1000, grant_s=0.02)
    key = uuid.uuid4().hex
    try:
        await limiter.take(key)
        await asyncio.sleep(0.1)
        await limiter.take(key)
    finally:
        await limiter.close()
    assert limiter.trips == 2


@pytest.mark.parametrize("calls", [1, 50])
async def test_redis_down_fails_open_and_logs_it_once(calls, caplog):
    limiter = RateLimiter(open_redis("redis://127.0.0.1:1/0", timeout_s=0.2), rate=1, burst=1)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            allowed, refused = await spend(limiter, "k", calls)
    finally:
        await limiter.close()
    assert allowed == calls and not refused
    logged = [r for r in caplog.records if r.name == "gateway.ratelimit"]
    # One line per outage, however many calls went through unlimited.
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.WARNING, "rate limits not enforced: redis unavailable")
    ]

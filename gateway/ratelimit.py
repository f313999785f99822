"""Per-key rate limits: a token bucket in Redis, shared by every gateway replica.

Each key may make ``rate`` calls per second on average with bursts up to
``burst``. The bucket lives in one Redis hash per key, updated by a Lua script
with Redis's own clock, so replicas agree. Redis down means the limit is not
enforced (fail open, logged once per outage), never that calls fail.
"""

from __future__ import annotations

import logging
import time

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import StrataError

__all__ = ["RateLimiter"]

_log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV: rate per second, burst. Returns {allowed, wait_ms}.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    """Token buckets per API key id."""

    def __init__(self, redis: aioredis.Redis, rate: float, burst: int, *, retry_s: float = 1.0) -> None:
        self._redis = redis
        self._rate = rate
        self._burst = burst
        self._script = redis.register_script(_TAKE)
        self._down_until = 0.0
        self._retry_s = retry_s

    async def take(self, key_id: str) -> None:
        """Spend one token of ``key_id``; RESOURCE_EXHAUSTED (with RetryInfo) when none is left."""
        if time.monotonic() < self._down_until:
            return
        try:
            allowed, wait_ms = await self._script(
                keys=[f"strata:ratelimit:{{{key_id}}}"], args=[self._rate, self._burst]
            )
        except (RedisError, OSError) as exc:
            if time.monotonic() >= self._down_until:
                _log.warning("rate limits not enforced: redis unavailable", extra={"error": repr(exc)})
            self._down_until = time.monotonic() + self._retry_s
            return
        if not allowed:
            raise StrataError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
                f"rate limit of {self._rate:g} calls/s (burst {self._burst}) exceeded",
                domain="strata.gateway",
                metadata={"key_id": key_id},
                retry_delay_s=int(wait_ms) / 1000,
            )

    async def close(self) -> None:
        await self._redis.aclose()

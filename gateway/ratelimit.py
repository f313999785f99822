"""Per-key rate limits: a token bucket in Redis, shared by every gateway replica.

Each key may make ``rate`` calls per second on average with bursts up to
``burst``. The bucket lives in one Redis hash per key, updated by a Lua script
with Redis's own clock, so replicas agree. Redis down means the limit is not
enforced (fail open, logged once per outage), never that calls fail.

A Redis round trip per call would cost more than the rest of the gateway's
work, so a replica takes tokens in grants of up to ``rate x grant_s`` (at
least 1) and spends them locally; a grant left unused expires after
``2 x grant_s``. Concurrent calls of one key share one refill. The limit
stays global: a replica can only spend tokens it took from the shared
bucket, and at most one grant per replica goes unused. For slow limits
(rate x grant_s < 2) every call takes its own token, exactly as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from shared.api.errors import Code, StrataError
from shared.cache.redisclient import Redis
from shared.cache.singleflight import SingleFlight

__all__ = ["RateLimiter"]

_log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV: rate per second, burst, tokens wanted.
# Takes up to the wanted number of whole tokens; returns {taken, wait_ms}.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local taken = math.min(want, math.floor(tokens))
local wait = 0
if taken >= 1 then
  tokens = tokens - taken
else
  taken = 0
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {taken, wait}
"""


@dataclass(slots=True)
class _Grant:
    tokens: int
    expires_at: float  # monotonic


class RateLimiter:
    """Token buckets per API key id."""

    def __init__(
        self,
        redis: Redis,
        rate: float,
        burst: int,
        *,
        retry_s: float = 1.0,
        grant_s: float = 0.05,
    ) -> None:
        self._redis = redis
        self._rate = rate
        self._burst = burst
        self._script = redis.register_script(_TAKE)
        self._down_until = 0.0
        self._retry_s = retry_s
        self._grant_size = max(1, min(burst, int(rate * grant_s)))
        self._grant_ttl_s = 2 * grant_s
        self._grants: dict[str, _Grant] = {}
        self._refills: SingleFlight[str, None] = SingleFlight()

    async def take(self, key_id: str) -> None:
        """Spend one token of ``key_id``; RESOURCE_EXHAUSTED (with RetryInfo) when none is left."""
        while True:
            if time.monotonic() < self._down_until:
                return
            grant = self._grants.get(key_id)
            if grant is not None and grant.tokens > 0 and grant.expires_at > time.monotonic():
                grant.tokens -= 1
                return
            await self._refills.do(key_id, lambda: self._refill(key_id))

    async def _refill(self, key_id: str) -> None:
        try:
            taken, wait_ms = await self._script(
                keys=[f"strata:ratelimit:{{{key_id}}}"], args=[self._rate, self._burst, self._grant_size]
            )
        except (RedisError, OSError) as exc:
            if time.monotonic() >= self._down_until:
                _log.warning("rate limits not enforced: redis unavailable", extra={"error": repr(exc)})
            self._down_until = time.monotonic() + self._retry_s
            return
        if not taken:
            raise StrataError(
                Code.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
                f"rate limit of {self._rate:g} calls/s (burst {self._burst}) exceeded",
                metadata={"key_id": key_id},
                retry_delay_s=int(wait_ms) / 1000,
            )
        now = time.monotonic()
        if len(self._grants) > 10_000:  # forget the grants of keys gone quiet
            self._grants = {k: g for k, g in self._grants.items() if g.expires_at > now}
        self._grants[key_id] = _Grant(int(taken), now + self._grant_ttl_s)

    async def close(self) -> None:
        await self._redis.aclose()

"""The Redis client every Strata process uses: one server, or a Redis Cluster.

``REDIS_URL`` names a single server (``redis://``, ``rediss://``,
``unix://``) or, with the scheme ``redis+cluster://`` (``rediss+cluster://``
for TLS), a Redis Cluster by one or more of its nodes::

    redis+cluster://:password@10.0.0.1:6379,10.0.0.2:6379

The client learns the rest of the cluster from them. Either way it fails
fast (no client-side retries, short timeouts): every caller decides for
itself what to bypass when Redis is away. On a cluster, an operation that
touches several keys must keep them in one hash slot, or split by slot:
:func:`slot_of` says which.
"""

from __future__ import annotations

from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

__all__ = ["CLUSTER_SCHEMES", "Redis", "is_cluster", "open_redis", "ready", "slot_of"]

Redis: TypeAlias = "aioredis.Redis | RedisCluster"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def open_redis(url: str, *, timeout_s: float = 0.5) -> Redis:
    """A client for ``url`` (a server, or a cluster: see the module docstring) that fails fast."""
    if not url.startswith(CLUSTER_SCHEMES):
        return aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
    return _Cluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=parts.scheme.startswith("rediss"),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One more try after a MOVED or a lost node (the slot map is refreshed), no more:
        # a master that is down must not hold each call for several timeouts.
        retry=Retry(NoBackoff(), 1),
        # Keep serving the slots of the masters that are up when one is down.
        require_full_coverage=False,
    )


class _Cluster(RedisCluster):
    """A RedisCluster whose first commands wait for its slot map before anything else.

    redis-py (8.1) lets commands issued concurrently before the first
    initialisation race on the node connections it then makes: some fail with
    AttributeError (seen as 1 failure in 3 runs of 20 concurrent GETs).
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


async def ready(redis: Redis) -> Redis:
    """``redis``, with a cluster's slot map loaded (a cluster pub/sub needs it before subscribing)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
    return redis


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` talks to a Redis Cluster."""
    return isinstance(redis, RedisCluster)


def slot_of(key: bytes) -> int:
    """The cluster hash slot of ``key`` (the part inside ``{...}`` when it has one)."""
    return int(key_slot(key))

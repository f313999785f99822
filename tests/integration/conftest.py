"""Integration fixtures: the Redis tests run against one server and against a Redis Cluster."""

from __future__ import annotations

import pytest

from shared.settings import Settings


@pytest.fixture(params=["server", "cluster"])
def redis_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    """The session's Redis server, then the session's three-master Redis Cluster."""
    if request.param == "server":
        return settings.redis_url
    return str(request.getfixturevalue("redis_cluster").url)

"""Integration fixtures: a pool on the session's Postgres; Redis as one server and as a Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared.config.settings import Settings
from shared.storage.db import Database


@pytest.fixture(params=["server", "cluster"])
def redis_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    """The session's Redis server, then the session's three-master Redis Cluster."""
    if request.param == "server":
        return settings.redis_url
    return str(request.getfixturevalue("redis_cluster").url)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    """A small pool on the session's Postgres, as the service role."""
    database = await Database.open(settings.database_url, min_size=1, max_size=2)
    yield database
    await database.close()

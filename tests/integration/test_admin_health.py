"""GetSystemHealth's verdict when parts are missing: real Postgres, a Redis that is not there, dead ports."""

from __future__ import annotations

from dataclasses import replace

from strata.admin.v1 import admin_pb2

from devstack.ports import free_port
from services.admin.operations import Operations
from services.admin.operations.health import COMPONENTS
from shared.cache.redisclient import open_redis
from shared.storage.db import Database


async def test_health_is_not_serving_with_a_reason_for_each_missing_part(settings):
    dead = {name: free_port() for name in COMPONENTS}
    lonely = replace(
        settings,
        upstreams=(),
        **{f"{name}_port": port for name, port in dead.items()},
    )
    db = await Database.open(settings.database_url, min_size=1, max_size=2)
    operations = Operations.for_settings(
        lonely, db, open_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    )
    try:
        health = await operations.health.system_health(timeout=10.0)
    finally:
        await operations.close()
        await db.close()
    assert health.status == admin_pb2.SERVING_STATUS_NOT_SERVING
    assert {c.component for c in health.components} == set(COMPONENTS)
    assert all(
        c.status == admin_pb2.SERVING_STATUS_NOT_SERVING and c.error == "UNAVAILABLE"
        for c in health.components
    )
    assert health.postgres.reachable, "Postgres is up: it is checked, and migrations read"
    assert not health.redis.reachable and health.redis.error
    assert not health.processes, "process figures live in Redis"
    assert {m.schema for m in health.migrations} == {"kv", "tenants", "vector", "admin"}
    reasons = "\n".join(health.reasons)
    for name, port in dead.items():
        assert f"{name} at 127.0.0.1:{port} is not serving" in reasons
    assert "redis is unreachable" in reasons
    assert "postgres" not in reasons


async def test_health_answers_when_postgres_is_gone_too(settings):
    db = await Database.open(settings.database_url, min_size=1, max_size=2)
    operations = Operations.for_settings(settings, db, open_redis(settings.redis_url))
    await db.pool.close()  # as if Postgres went away: every statement fails
    try:
        health = await operations.health.system_health(timeout=10.0)
    finally:
        await operations.close()
    assert health.status == admin_pb2.SERVING_STATUS_NOT_SERVING
    assert not health.postgres.reachable and health.postgres.error
    assert not health.migrations
    assert any(r.startswith("postgres is unreachable") for r in health.reasons)
    assert health.redis.reachable

"""Embedded Postgres with streaming replicas, for tests: start them, and steer replay.

:func:`replicated_backends` opens the embedded backends (Postgres, Redis,
migrations) with ``STRATA_EMBEDDED_REPLICAS`` replicas on free ports; the other
helpers act on a replica through its owner (superuser) URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from devstack.backends import Backends, open_backends
from devstack.ports import free_port, port_is_free
from shared.config.settings import Settings

__all__ = ["pause_replay", "replicated_backends", "resume_replay", "wait_replayed"]

SERVICES = ("kv", "tenants", "vector", "admin")


def free_port_run(length: int, avoid: tuple[int, ...] = ()) -> int:
    """A port p with p .. p + length - 1 all free on 127.0.0.1 right now (and none in ``avoid``)."""
    for _ in range(200):
        first = free_port()
        run = range(first, first + length)
        if run[-1] <= 65535 and not set(run) & set(avoid) and all(port_is_free(port) for port in run[1:]):
            return first
    raise RuntimeError(f"no run of {length} free ports found")


@contextlib.asynccontextmanager
async def replicated_backends(data_dir: Path, replicas: int = 2) -> AsyncIterator[Backends]:
    """Embedded backends under ``data_dir`` with ``replicas`` streaming replicas, closed on exit.

    The primary gets a free port p whose successors p+1 .. p+replicas (the
    replicas' ports) are free too; Redis another free port. A second use of
    the same ``data_dir`` reuses its data (and replica folders) on new ports.
    """
    pg_port = free_port_run(replicas + 1)
    redis_port = free_port()
    while pg_port <= redis_port <= pg_port + replicas:
        redis_port = free_port()
    settings = Settings(
        data_dir=data_dir,
        embedded_pg_port=pg_port,
        embedded_redis_port=redis_port,
        embedded_replicas=replicas,
    )
    backends = await open_backends(settings, SERVICES)
    try:
        yield backends
    finally:
        backends.close()


async def wait_replayed(replica_owner_url: str, primary_owner_url: str, timeout: float = 10.0) -> str:
    """Wait until the replica has replayed the primary's WAL as it is now; that LSN."""
    primary = await asyncpg.connect(primary_owner_url)
    try:
        lsn: str = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
    finally:
        await primary.close()
    replica = await asyncpg.connect(replica_owner_url)
    try:
        deadline = time.monotonic() + timeout
        while not await replica.fetchval(
            "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", lsn
        ):
            if time.monotonic() > deadline:
                replayed = await replica.fetchval("SELECT pg_last_wal_replay_lsn()::text")
                raise TimeoutError(f"the replica replayed up to {replayed}, not {lsn}, in {timeout:g}s")
            await asyncio.sleep(0.02)
    finally:
        await replica.close()
    return lsn


async def pause_replay(url: str) -> None:
    """Pause WAL replay on the replica at ``url`` (a superuser URL); WAL keeps arriving, unapplied.

    Once this returns no further WAL record is applied: the startup process
    checks the request before each one.
    """
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_wal_replay_pause()")
    finally:
        await conn.close()


async def resume_replay(url: str) -> None:
    """Resume WAL replay on the replica at ``url`` (a superuser URL)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_wal_replay_resume()")
    finally:
        await conn.close()

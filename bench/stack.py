"""A Strata for benchmarking: embedded Postgres and Redis, and the launcher's processes.

The backends are started once (in-process, as ``make run`` does) under
``.strata/bench``; the launcher runs in external mode against them, so it
can be restarted with other settings (tracing on) while the data stays.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from bench.target import Target
from devstack.backends import Backends, open_backends
from devstack.launcher import SERVICES, launch
from devstack.ports import free_port
from devstack.roles import roles_environment, start_roles
from shared.config.settings import load_settings

__all__ = ["bench_backends", "running_strata"]

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = ("gateway", "kv", "tenants", "vector", "admin")


@contextlib.asynccontextmanager
async def bench_backends(data_dir: Path) -> AsyncIterator[Backends]:
    """Embedded Postgres + Redis under ``data_dir``, migrated; stopped on exit."""
    settings = replace(
        load_settings({"STRATA_DATA_DIR": str(data_dir)}),
        embedded_pg_port=free_port(),
        embedded_redis_port=free_port(),
    )
    backends = await open_backends(settings, tuple(SERVICES))
    try:
        yield backends
    finally:
        backends.close()


@contextlib.asynccontextmanager
async def running_strata(
    backends: Backends, data_dir: Path, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Target]:
    """The launcher's processes on ``backends`` (external mode), with ``extra_env``; stopped on exit."""
    ports = {name: free_port() for name in PROCESSES}
    secret = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "OTEL_"))}
    env.update(
        DATABASE_URL=backends.database_url,
        REDIS_URL=backends.redis_url,
        STRATA_MIGRATE_DATABASE_URL=backends.migrate_database_url,
        STRATA_DATA_DIR=str(data_dir),
        STRATA_INTERNAL_SECRET=secret,
        STRATA_KEY_PEPPER="bench-key-pepper-0123456789",
        STRATA_LOG_LEVEL="WARNING",
        # Cache counters fresh enough to take before and after a 5 s run.
        STRATA_STATS_INTERVAL_S="0.25",
        # The bench measures throughput: rate limits would measure themselves.
        STRATA_RATE_LIMIT_RPS="1000000000",
        STRATA_RATE_LIMIT_BURST="1000000000",
        # h2load sends one signed identity for a whole run straight to a service: let it last one.
        STRATA_IDENTITY_MAX_AGE_S="300",
        # Every load comes from 127.0.0.1; a failed call must not lock the bench out.
        STRATA_AUTH_FAILURES_PER_PEER_BURST="1000000",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"STRATA_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env.update(extra_env or {})
    launched = await launch(env, ROOT)
    try:
        # Beside the split shape, every role in one process (python -m roles) on ports of its
        # own: its gateway is the target "all".
        async with _all_roles(env) as (all_port, all_pid):
            yield Target(
                ports={**ports, "all": all_port},
                api_key=(data_dir / "dev-api-key").read_text().strip(),
                internal_secret=secret,
                database_url=backends.database_url,
                redis_url=backends.redis_url,
                pids=launched.pids(),
                one_process_pid=all_pid,
            )
    finally:
        await launched.stop()


@contextlib.asynccontextmanager
async def _all_roles(env: dict[str, str]) -> AsyncIterator[tuple[int, int]]:
    """A ``python -m roles`` process with every role, on ``env``'s backends; (gateway port, pid)."""
    hosted = await start_roles(*roles_environment(env, "all"), ROOT)
    try:
        yield hosted.ports["gateway"], hosted.process.pid
    finally:
        await hosted.stop()

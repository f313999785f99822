"""Shared fixtures: one set of real backends per test session.

With DATABASE_URL and REDIS_URL set, the suite uses those servers; otherwise
it starts the embedded Postgres and Redis under ``.strata/test`` on free
ports (wiped at the start of each session). Tests isolate themselves by
namespace: each gets a fresh one from the ``namespace`` fixture.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from strata.kv.v1 import kv_pb2_grpc

from devstack.backends import Backends, open_backends
from devstack.launcher import SERVICES
from devstack.ports import free_port
from services.kv.app import build_kv_server
from shared.api.callers import Caller
from shared.config.settings import Settings, load_settings
from shared.rpc.identity import signing_interceptors
from shared.rpc.server import StrataServer
from tests.support.redis_cluster import RedisClusterProcesses

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# One folder per pytest process, so concurrent sessions never share a server.
TEST_DATA_DIR = PROJECT_ROOT / ".strata" / f"test-{os.getpid()}"
TEST_INTERNAL_SECRET = "test-internal-secret-not-for-production"
TENANT = Caller("tenant-a", frozenset({"kv:read", "kv:write"}), "key-a")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings for the test backends (free ports, test data folder)."""
    env = dict(os.environ)
    env.setdefault("STRATA_DATA_DIR", str(TEST_DATA_DIR))
    env.setdefault("STRATA_EMBEDDED_PG_PORT", str(free_port()))
    env.setdefault("STRATA_EMBEDDED_REDIS_PORT", str(free_port()))
    env.setdefault("STRATA_KV_SWEEP_INTERVAL_S", "0.2")
    env.setdefault("STRATA_INTERNAL_SECRET", TEST_INTERNAL_SECRET)
    return load_settings(env)


@pytest.fixture(scope="session")
async def backends(base_settings: Settings) -> AsyncIterator[Backends]:
    """Migrated Postgres and Redis for the whole session."""
    _remove_stale_test_folders()
    started = await open_backends(base_settings, tuple(SERVICES))
    yield started
    started.close()
    if base_settings.data_dir == TEST_DATA_DIR:
        shutil.rmtree(TEST_DATA_DIR, ignore_errors=True)


def _remove_stale_test_folders() -> None:
    # Left behind by killed sessions: their pid is gone.
    for folder in TEST_DATA_DIR.parent.glob("test-*"):
        pid = folder.name.removeprefix("test-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A three-master Redis Cluster on loopback, started the first time a test asks for it."""
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def settings(base_settings: Settings, backends: Backends) -> Settings:
    """Settings as a service sees them: the backends' URLs filled in."""
    return replace(
        base_settings,
        database_url=backends.database_url,
        redis_url=backends.redis_url,
        migrate_database_url=backends.migrate_database_url,
    )


@pytest.fixture(scope="session")
async def kv_server(settings: Settings) -> AsyncIterator[StrataServer]:
    """An in-process KV server on a free port."""
    server = await build_kv_server(settings)
    await server.start(0)
    yield server
    await server.stop(grace=1.0)


def signed_channel(port: int, caller: Caller, secret: str = TEST_INTERNAL_SECRET) -> grpc.aio.Channel:
    """A channel to a service on ``port`` whose calls are signed as ``caller``."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=signing_interceptors(secret.encode(), caller)
    )


@pytest.fixture(scope="session")
async def kv_channel(kv_server: StrataServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the in-process KV server, signed as tenant-a with kv scopes."""
    async with signed_channel(kv_server.port, TENANT) as channel:
        yield channel


@pytest.fixture(scope="session")
def kv(kv_channel: grpc.aio.Channel) -> kv_pb2_grpc.KvServiceStub:
    """A generated stub for the in-process KV server."""
    return kv_pb2_grpc.KvServiceStub(kv_channel)


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"

"""Streaming replicas of the embedded Postgres (``STRATA_EMBEDDED_REPLICAS``), as real processes.

One primary with two replicas serves the module, under a data folder of its
own; the last tests stop it and start it again on the same folder.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from devstack.backends import Backends
from devstack.embedded import EmbeddedPostgres, EmbeddedReplica
from devstack.ports import free_port
from tests.support.replicas import pause_replay, replicated_backends, resume_replay, wait_replayed

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SLOTS = ["strata_replica_1", "strata_replica_2"]


@dataclass
class Cluster:
    data_dir: Path
    backends: Backends

    @property
    def primary_url(self) -> str:
        return self.backends.migrate_database_url

    @property
    def replicas(self) -> list[EmbeddedReplica]:
        return self.backends.replicas


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    """A primary and two replicas, with a table ``replica_test.rows`` (text ids) made on the primary."""
    data_dir = PROJECT_ROOT / ".strata" / f"test-replicas-{uuid.uuid4().hex[:12]}"
    try:
        async with replicated_backends(data_dir, replicas=2) as backends:
            conn = await asyncpg.connect(backends.migrate_database_url)
            try:
                await conn.execute(
                    "CREATE SCHEMA replica_test; CREATE TABLE replica_test.rows (id text PRIMARY KEY)"
                )
            finally:
                await conn.close()
            yield Cluster(data_dir, backends)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def insert_row(url: str) -> str:
    row = uuid.uuid4().hex
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO replica_test.rows VALUES ($1)", row)
    finally:
        await conn.close()
    return row


async def has_row(url: str, row: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM replica_test.rows WHERE id = $1)", row))
    finally:
        await conn.close()


async def wait_streaming(primary_url: str, expected: set[str], timeout: float = 20.0) -> list[asyncpg.Record]:
    """pg_stat_replication once every ``expected`` application streams; its rows."""
    conn = await asyncpg.connect(primary_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch("SELECT application_name, state FROM pg_stat_replication")
            if {r["application_name"] for r in rows if r["state"] == "streaming"} >= expected:
                return list(rows)
            assert time.monotonic() < deadline, f"not all streaming: {rows}"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def slots(primary_url: str) -> dict[str, tuple[str, bool]]:
    conn = await asyncpg.connect(primary_url)
    try:
        rows = await conn.fetch("SELECT slot_name, slot_type, active FROM pg_replication_slots")
    finally:
        await conn.close()
    return {r["slot_name"]: (r["slot_type"], r["active"]) for r in rows}


async def test_both_replicas_stream_through_their_slots(cluster: Cluster) -> None:
    rows = await wait_streaming(cluster.primary_url, set(SLOTS))
    assert sorted(r["application_name"] for r in rows) == SLOTS
    assert await slots(cluster.primary_url) == {slot: ("physical", True) for slot in SLOTS}


async def test_replica_folders_ports_urls_and_settings(cluster: Cluster) -> None:
    primary = cluster.backends.postgres
    assert primary is not None
    data_dir = cluster.data_dir.resolve()
    assert [r.pgdata for r in cluster.replicas] == [data_dir / "pg-replica-1", data_dir / "pg-replica-2"]
    assert [r.port for r in cluster.replicas] == [primary.port + 1, primary.port + 2]
    assert [r.slot for r in cluster.replicas] == SLOTS
    assert cluster.backends.database_read_urls == tuple(r.urls.service for r in cluster.replicas)
    for replica, read_url in zip(cluster.replicas, cluster.backends.database_read_urls, strict=True):
        assert replica.pid is not None
        assert f"@127.0.0.1:{replica.port}/" in read_url
        conn = await asyncpg.connect(read_url)
        try:
            assert tuple(await conn.fetchrow("SELECT current_user, pg_is_in_recovery()")) == (
                "strata_service",
                True,
            )
            assert await conn.fetchval("SHOW hot_standby_feedback") == "on"
        finally:
            await conn.close()
        # The password the standby reconnects with is in this file: the pgserver user's alone.
        assert stat.S_IMODE(replica.pgdata.stat().st_mode) == 0o700
        assert stat.S_IMODE((replica.pgdata / "postgresql.auto.conf").stat().st_mode) == 0o600


async def test_a_row_written_on_the_primary_appears_on_each_replica(cluster: Cluster) -> None:
    row = await insert_row(cluster.primary_url)
    for replica in cluster.replicas:
        await wait_replayed(replica.urls.owner, cluster.primary_url)
        assert await has_row(replica.urls.owner, row)


@pytest.mark.parametrize("role", ["owner", "service"])
async def test_a_write_on_a_replica_fails_as_read_only(cluster: Cluster, role: str) -> None:
    replica = cluster.replicas[0]
    conn = await asyncpg.connect(getattr(replica.urls, role))
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("CREATE TABLE public.nope (id int)")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await insert_row(replica.urls.owner)


async def test_a_paused_replica_misses_new_rows_until_resumed(cluster: Cluster) -> None:
    paused, other = cluster.replicas
    await pause_replay(paused.urls.owner)
    try:
        row = await insert_row(cluster.primary_url)
        lsn = await wait_replayed(other.urls.owner, cluster.primary_url)
        assert await has_row(other.urls.owner, row)
        # The paused replica has received the row's WAL, and not applied it.
        conn = await asyncpg.connect(paused.urls.owner)
        try:
            deadline = time.monotonic() + 10
            while not await conn.fetchval("SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn", lsn):
                assert time.monotonic() < deadline, "the paused replica never received the WAL"
                await asyncio.sleep(0.02)
            assert await conn.fetchval("SELECT pg_get_wal_replay_pause_state()") == "paused"
        finally:
            await conn.close()
        assert not await has_row(paused.urls.owner, row)
    finally:
        await resume_replay(paused.urls.owner)
    await wait_replayed(paused.urls.owner, cluster.primary_url)
    assert await has_row(paused.urls.owner, row)


# -- stop and start again (these come last: they take the module's cluster down) --


async def test_a_restart_reuses_the_replica_folders_and_catches_up(cluster: Cluster) -> None:
    before = await insert_row(cluster.primary_url)
    for replica in cluster.replicas:
        await wait_replayed(replica.urls.owner, cluster.primary_url)
        (replica.pgdata / "strata-test-marker").touch()  # a new copy would not have it
    cluster.backends.close()

    # The primary alone (on another port) takes a write the stopped replicas have not seen.
    primary = EmbeddedPostgres(cluster.data_dir, free_port())
    try:
        missed = await insert_row(primary.start().owner)
    finally:
        primary.stop()

    async with replicated_backends(cluster.data_dir, replicas=2) as again:
        assert [(r.pgdata / "strata-test-marker").exists() for r in again.replicas] == [True, True]
        await wait_streaming(again.migrate_database_url, set(SLOTS))
        assert await slots(again.migrate_database_url) == {slot: ("physical", True) for slot in SLOTS}
        for replica in again.replicas:
            await wait_replayed(replica.urls.owner, again.migrate_database_url)
            assert await has_row(replica.urls.owner, before)
            assert await has_row(replica.urls.owner, missed)


async def test_fewer_replicas_retire_the_surplus_slot_and_folder(cluster: Cluster) -> None:
    async with replicated_backends(cluster.data_dir, replicas=1) as fewer:
        assert [r.slot for r in fewer.replicas] == ["strata_replica_1"]
        await wait_streaming(fewer.migrate_database_url, {"strata_replica_1"})
        assert await slots(fewer.migrate_database_url) == {"strata_replica_1": ("physical", True)}
        assert not (cluster.data_dir / "pg-replica-2").exists()
        assert (cluster.data_dir / "pg-replica-1" / "strata-test-marker").exists()


async def test_a_removed_replica_folder_is_copied_anew_through_its_old_slot_name(cluster: Cluster) -> None:
    # After the test above: replica 1's folder (with the marker) and slot remain; replica 2 has neither.
    shutil.rmtree(cluster.data_dir / "pg-replica-1")
    async with replicated_backends(cluster.data_dir, replicas=2) as again:
        await wait_streaming(again.migrate_database_url, set(SLOTS))
        assert await slots(again.migrate_database_url) == {slot: ("physical", True) for slot in SLOTS}
        assert [(r.pgdata / "strata-test-marker").exists() for r in again.replicas] == [False, False]
        row = await insert_row(again.migrate_database_url)
        for replica in again.replicas:
            await wait_replayed(replica.urls.owner, again.migrate_database_url)
            assert await has_row(replica.urls.owner, row)

"""Point-in-time recovery of the embedded Postgres, with real servers: archive, base backups, branches.

The module starts its own embedded Postgres and Redis under a data folder of
its own, and an in-process admin server managing their PITR folder, as the
launcher sets it up in embedded mode. Branches are real postmasters, children
of this process through the admin server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from strata.admin.v1 import admin_pb2

from devstack.backends import Backends, open_backends
from devstack.ports import free_port
from services.admin.app import build_admin_server
from services.admin.branches.pitr import PointInTime
from shared.api.callers import Caller
from shared.config.settings import Settings
from shared.rpc.server import StrataServer
from shared.storage.db import Database
from tests.conftest import TEST_INTERNAL_SECRET, signed_channel
from tests.support.calls import AdminStubs
from tests.support.errors import error_info, field_violations

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("kv", "tenants", "vector", "admin")
OPERATOR = Caller("dev", frozenset({"operator"}), "pitr-test-key")
ADMIN = "/strata.admin.v1.BackupService/"


@dataclass
class Managed:
    """Embedded backends and an admin server managing their point-in-time recovery."""

    data_dir: Path
    backends: Backends
    settings: Settings  # the admin server's
    server: StrataServer | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def admin(self) -> AdminStubs:
        assert self.channel is not None
        return AdminStubs(self.channel)

    @property
    def pitr(self) -> Path:
        return self.data_dir / "pitr"

    @property
    def service_password(self) -> str:
        return (self.data_dir / "secrets" / "pg-service-password").read_text().strip()

    async def start_admin(self) -> None:
        self.server = await build_admin_server(self.settings)
        await self.server.start(0)
        self.channel = signed_channel(self.server.port, OPERATOR)

    async def stop_admin(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        self.server = self.channel = None

    async def owner(self, port: int | None = None) -> asyncpg.Connection:
        """The owner role on the live server, or on the branch at ``port``."""
        return await asyncpg.connect(self.backends.migrate_database_url, port=port)


@pytest.fixture(scope="module")
async def managed() -> AsyncIterator[Managed]:
    data_dir = PROJECT_ROOT / ".strata" / f"test-pitr-{uuid.uuid4().hex[:12]}"
    base = Settings(data_dir=data_dir, embedded_pg_port=free_port(), embedded_redis_port=free_port())
    backends = await open_backends(base, SERVICES)
    settings = replace(
        base,
        database_url=backends.database_url,
        migrate_database_url=backends.migrate_database_url,
        redis_url=backends.redis_url,
        internal_secret=TEST_INTERNAL_SECRET,
        key_pepper="test-key-pepper-not-for-production",
        pitr_dir=str(data_dir / "pitr"),  # as the launcher sets it for admin in embedded mode
        pitr_keep_base_backups=2,
    )
    managed = Managed(data_dir, backends, settings)
    try:
        conn = await managed.owner()
        try:
            await conn.execute("CREATE SCHEMA pitr_test; CREATE TABLE pitr_test.items (id text PRIMARY KEY)")
        finally:
            await conn.close()
        await managed.start_admin()
        await first_window(managed)
        yield managed
    finally:
        await managed.stop_admin()
        backends.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def first_window(managed: Managed, timeout: float = 60.0) -> admin_pb2.GetRecoveryWindowResponse:
    """GetRecoveryWindow once the first base backup is complete."""
    deadline = time.monotonic() + timeout
    while True:
        window = await managed.admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest())
        if window.HasField("earliest_time"):
            return window
        assert time.monotonic() < deadline, "no base backup in time"
        await asyncio.sleep(0.1)


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(moment)
    return value


async def execute(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    await conn.execute(sql, *args)


async def items(conn: asyncpg.Connection) -> set[str]:
    return {r["id"] for r in await conn.fetch("SELECT id FROM pitr_test.items")}


async def branch_at(managed: Managed, name: str, as_of: datetime) -> admin_pb2.Branch:
    made = await managed.admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name, as_of=stamp(as_of)))
    return made.branch


def port_of(branch: admin_pb2.Branch) -> int:
    return int(branch.address.rsplit(":", 1)[1])


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def listed(managed: Managed) -> dict[str, admin_pb2.Branch]:
    branches = await managed.admin.ListBranches(admin_pb2.ListBranchesRequest())
    return {b.name: b for b in branches.branches}


async def audited(managed: Managed, name: str) -> list[str]:
    events = await managed.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(target_prefix=f"branch/{name}")
    )
    return [e.action.removeprefix(ADMIN) for e in events.events]


# -- the window ----------------------------------------------------------------------


async def test_the_window_opens_with_the_first_base_backup_and_ends_now(managed):
    before = datetime.now(UTC)
    window = await managed.admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest())
    [backup] = window.base_backups
    assert window.earliest_time == backup.finish_time
    assert window.earliest_time.ToDatetime(UTC) < before <= window.latest_time.ToDatetime(UTC)
    assert backup.bytes > 10_000_000 and backup.start_wal
    assert (managed.pitr / "base" / backup.name / "backup_label").exists()
    # The backup's own segment is archived once it ends.
    assert window.last_archived_wal >= backup.start_wal and window.archive_bytes > 0


# -- branches at a time ---------------------------------------------------------------


async def test_a_branch_at_a_time_holds_what_was_committed_by_then_and_the_live_server_is_unchanged(managed):
    a, b = f"A-{uuid.uuid4().hex[:8]}", f"B-{uuid.uuid4().hex[:8]}"
    live = await managed.owner()
    try:
        await execute(live, "INSERT INTO pitr_test.items VALUES ($1)", a)
        await asyncio.sleep(0.01)
        as_of = datetime.now(UTC)
        await asyncio.sleep(0.01)
        await execute(live, "INSERT INTO pitr_test.items VALUES ($1)", b)
        await execute(live, "DELETE FROM pitr_test.items WHERE id = $1", a)
        live_before = await items(live)

        started = time.monotonic()
        branch = await branch_at(managed, "at_t", as_of)
        seconds = time.monotonic() - started

        assert b in live_before and a not in live_before
        assert await items(live) == live_before, "the live server is unchanged"
    finally:
        await live.close()
    assert (branch.name, branch.origin, branch.running) == ("at_t", "point_in_time", True)
    assert branch.as_of.ToDatetime(UTC) == as_of
    port = port_of(branch)
    assert branch.address == f"127.0.0.1:{port}"
    assert branch.connection_string == f"postgresql://strata_service@127.0.0.1:{port}/strata"
    assert branch.bytes > 10_000_000
    print(f"point-in-time branch made in {seconds:.2f}s")

    copy = await managed.owner(port)
    try:
        rows = await items(copy)
        assert a in rows and b not in rows
        assert not await copy.fetchval("SELECT pg_is_in_recovery()"), "promoted"
        await execute(copy, "INSERT INTO pitr_test.items VALUES ('written-in-the-branch')")
    finally:
        await copy.close()
    live = await managed.owner()
    try:
        assert "written-in-the-branch" not in await items(live), "the two have diverged"
    finally:
        await live.close()
    service = await asyncpg.connect(branch.connection_string, password=managed.service_password)
    try:
        assert await service.fetchval("SELECT current_user") == "strata_service"
    finally:
        await service.close()

    again = (await listed(managed))["at_t"]
    again.ClearField("bytes")  # the write above grew it
    branch.ClearField("bytes")
    assert again == branch
    assert await audited(managed, "at_t") == ["CreateBranch"]


async def test_as_of_outside_the_window_is_invalid_argument(managed):
    window = await managed.admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest())
    earliest = window.earliest_time.ToDatetime(UTC)
    for as_of in (earliest - timedelta(microseconds=1), datetime.now(UTC) + timedelta(hours=1)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await branch_at(managed, "outside", as_of)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert set(field_violations(caught.value)) == {"as_of"}
        assert "recoverable window" in field_violations(caught.value)["as_of"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await managed.admin.CreateBranch(
            admin_pb2.CreateBranchRequest(name="outside", as_of=timestamp_pb2.Timestamp(seconds=2**62))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"as_of"}
    assert "outside" not in await listed(managed)
    assert not (managed.pitr / "branches" / "outside").exists()


async def test_a_taken_name_is_already_exists_and_leaves_the_branch_alone(managed):
    branch = await branch_at(managed, "taken", datetime.now(UTC))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await branch_at(managed, "taken", datetime.now(UTC))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).reason == "BRANCH_ALREADY_EXISTS"
    assert (await listed(managed))["taken"].running and not port_refuses(port_of(branch))
    await managed.admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name="taken"))


def postmasters_of(folder: Path) -> list[int]:
    """Pids of processes running with ``folder`` on their command line."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


async def test_a_call_that_gives_up_half_way_leaves_nothing_or_a_whole_branch(managed):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await managed.admin.CreateBranch(
            admin_pb2.CreateBranchRequest(name="hasty", as_of=stamp(datetime.now(UTC))), timeout=0.15
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    folder = managed.pitr / "branches" / "hasty"
    deadline = time.monotonic() + 30
    while True:  # the clean-up goes on after the call has ended
        branch = (await listed(managed)).get("hasty")
        partial = folder.with_name("hasty.partial").exists()
        if branch is None and not partial and not folder.exists() and not postmasters_of(folder):
            break  # cut short: nothing kept
        if branch is not None and branch.running and not partial:
            await managed.admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name="hasty"))
            break  # finished before the cancellation reached it: whole
        assert time.monotonic() < deadline, (branch, partial, folder.exists())
        await asyncio.sleep(0.05)


async def test_delete_branch_stops_its_server_and_removes_its_folder(managed):
    branch = await branch_at(managed, "doomed", datetime.now(UTC))
    port = port_of(branch)
    folder = managed.pitr / "branches" / "doomed"
    assert folder.is_dir() and not port_refuses(port)

    await managed.admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name="doomed"))

    assert port_refuses(port)
    assert not folder.exists() and not folder.with_name("doomed.log").exists()
    assert "doomed" not in await listed(managed)
    assert await audited(managed, "doomed") == ["DeleteBranch", "CreateBranch"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await managed.admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name="doomed"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_branches_stop_with_the_admin_server_and_start_again_with_it(managed):
    branch = await branch_at(managed, "kept", datetime.now(UTC))
    port = port_of(branch)
    copy = await managed.owner(port)
    try:
        await execute(copy, "INSERT INTO pitr_test.items VALUES ('kept-row')")
    finally:
        await copy.close()

    await managed.stop_admin()
    assert port_refuses(port), "stopped with the admin server"
    await managed.start_admin()

    deadline = time.monotonic() + 30
    while not (await listed(managed))["kept"].running:
        assert time.monotonic() < deadline, "not started again"
        await asyncio.sleep(0.1)
    assert (await listed(managed))["kept"].address == f"127.0.0.1:{port}"
    copy = await managed.owner(port)
    try:
        assert "kept-row" in await items(copy)
    finally:
        await copy.close()
    await managed.admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name="kept"))


# -- base backups ---------------------------------------------------------------------


async def test_base_backups_rotate_keeping_the_newest_and_the_wal_they_need(managed):
    db = await Database.open(managed.settings.database_url, min_size=1, max_size=2)
    try:
        pitr = PointInTime.for_settings(managed.settings, db)  # the admin server's scheduler waits an hour
        first = (await managed.admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest())).base_backups[0]
        taken = [await pitr.take_base_backup(), await pitr.take_base_backup()]
    finally:
        await db.close()

    window = await managed.admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest())
    assert [b.name for b in window.base_backups] == [b.name for b in taken], "keeps 2"
    assert sorted(p.name for p in (managed.pitr / "base").iterdir()) == [b.name for b in taken]
    assert window.earliest_time.ToDatetime(UTC) == taken[0].finish_time
    oldest_needed = taken[0].start_segment
    archived = [p.name for p in (managed.pitr / "wal").iterdir()]
    assert first.start_wal < oldest_needed
    assert all(name[8:24] >= oldest_needed[8:] for name in archived if not name.endswith(".history"))
    assert oldest_needed in archived

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await branch_at(managed, "too_early", first.finish_time.ToDatetime(UTC))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- an external database ------------------------------------------------------------------


async def test_with_an_external_database_pitr_is_failed_precondition(managed):
    server = await build_admin_server(replace(managed.settings, pitr_dir=""))
    await server.start(0)
    try:
        async with signed_channel(server.port, OPERATOR) as channel:
            admin = AdminStubs(channel)
            for call in (
                admin.GetRecoveryWindow(admin_pb2.GetRecoveryWindowRequest()),
                admin.CreateBranch(
                    admin_pb2.CreateBranchRequest(name="nope", as_of=stamp(datetime.now(UTC)))
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(caught.value).reason == "PITR_NOT_MANAGED"
                assert "belongs to the provider" in caught.value.details()
    finally:
        await server.stop(grace=1.0)

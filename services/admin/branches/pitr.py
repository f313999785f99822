"""Point-in-time branches: servers of their own, restored from the WAL archive to a time.

Only in embedded mode (see :mod:`.wal_archive`, which keeps the base backups
and says what window a branch can be made in). A branch is restored from the
newest backup finished by ``as_of`` and run by this process
(``devstack.pitr.PointInTimeServer``): stopped when it stops; on start, ready
ones are started again (any postmaster a killed predecessor left is stopped
first) and unfinished ones removed. They are listed in ``admin.branches``
(origin ``point_in_time``) with their port, and audited like the other
branches. Making or deleting one holds the archive's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import timestamp_pb2
from strata.admin.v1 import admin_pb2

from devstack.pitr import BaseBackup, PitrFolder, PointInTimeServer, service_url
from devstack.ports import free_port, port_is_free
from services.admin.branches.mapping import branch_message
from services.admin.branches.names import checked_name, no_branch
from services.admin.branches.owner import OwnerRole
from services.admin.branches.registry import BranchRegistry, BranchRow
from services.admin.branches.tools import to_the_end
from services.admin.branches.wal_archive import WalArchive
from shared.api.errors import Code, FieldViolation, StrataError, invalid_argument
from shared.config.settings import Settings
from shared.rpc.handlers import Context
from shared.storage.db import Database, deadline_timeout

__all__ = ["PointInTime"]

_RESTORE_LIMIT_S = 3600.0  # replaying an interval's WAL; a call's deadline shortens it
_START_RETRY_S = 5.0  # after a failed start-up (the primary or the registry not answering yet)
_NOT_REACHED = "recovery ended before configured recovery target was reached"
# Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_log = logging.getLogger(__name__)


class PointInTime:
    """The point-in-time branches' servers, and the WAL archive they are restored from."""

    def __init__(
        self, db: Database, pitr_dir: str, owner_url: str = "", interval_s: float = 3600.0, keep: int = 2
    ) -> None:
        """``pitr_dir``: the PITR folder the launcher gives admin in embedded mode."""
        owner = OwnerRole.parse(owner_url) if owner_url else None
        self._archive = WalArchive(PitrFolder(Path(pitr_dir)), owner, interval_s, keep)
        self._registry = BranchRegistry(db)
        self._servers: dict[str, PointInTimeServer] = {}
        self._started = asyncio.Event()  # folders ready and branches started again
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, db: Database) -> PointInTime:
        """On ``settings.pitr_dir`` (set by the launcher in embedded mode only)."""
        return cls(
            db,
            settings.pitr_dir,
            settings.migrate_database_url,
            settings.pitr_base_backup_interval_s,
            settings.pitr_keep_base_backups,
        )

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work (folders, branches from before, base backups)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain(self._archive))

    async def close(self) -> None:
        """Stop the background work (killing a base backup under way) and every branch's server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        servers = list(self._servers.values())
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers), return_exceptions=True)

    async def take_base_backup(self) -> BaseBackup:
        """Take a base backup now (see :meth:`WalArchive.take_base_backup`)."""
        return await self._archive.take_base_backup()

    async def _maintain(self, archive: WalArchive) -> None:
        while not self._started.is_set():
            try:
                await self._start_up(archive)
                self._started.set()
            except Exception:
                _log.exception("point-in-time recovery could not start; retrying")
                await asyncio.sleep(_START_RETRY_S)
        await archive.keep_backing_up()

    async def _start_up(self, archive: WalArchive) -> None:
        folder = archive.folder
        await asyncio.to_thread(folder.prepare)  # from here on the primary archives
        await asyncio.to_thread(folder.remove_partials)
        await archive.check_cluster()
        timeout = 30.0
        known: set[str] = set()
        for row in await self._registry.servers(timeout):
            name, port = row.name, row.port or 0
            server = PointInTimeServer(folder, name, port)
            if not row.ready:  # its making was interrupted: nothing to keep
                await asyncio.to_thread(_stop_and_remove, server)
                await self._registry.release(row.id, timeout)
                continue
            known.add(name)
            self._servers[name] = server
            if not server.pgdata.is_dir():
                _log.error("a point-in-time branch's folder is missing", extra={"branch": name})
                continue
            try:
                now = await asyncio.to_thread(_restart, server)
            except RuntimeError:
                _log.exception(
                    "a point-in-time branch did not start", extra={"branch": name, "log": server.log_tail()}
                )
                continue
            if now != port:
                await self._registry.move(row.id, now, timeout)
                _log.warning(
                    "a point-in-time branch moved to another port", extra={"branch": name, "port": now}
                )
        for entry in await asyncio.to_thread(folder.branch_folders):
            if entry.endswith(".partial"):  # a copy cut short
                await asyncio.to_thread(folder.remove_branch_folder, entry)
            elif entry not in known:  # no registered branch (forgotten while its server was being removed)
                await asyncio.to_thread(_stop_and_remove, PointInTimeServer(folder, entry, 0))

    # -- calls -----------------------------------------------------------------------

    async def recovery_window(self, context: Context) -> admin_pb2.GetRecoveryWindowResponse:
        """The window CreateBranch's ``as_of`` must fall in, the kept base backups and the archive's state."""
        archive = self._archive
        await self._wait_started(context)
        return await archive.window(context)

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        """A new server restored to ``request.as_of``, started, promoted and registered (audited)."""
        name = checked_name(request.name, "name")
        as_of = _checked_time(request.as_of, "as_of")
        archive = self._archive
        folder = archive.folder
        archive.owner_role()  # FAILED_PRECONDITION before anything is reserved
        await self._wait_started(context)
        async with archive.lock:
            backups = await asyncio.to_thread(folder.base_backups)
            if not backups:
                raise StrataError(
                    Code.UNAVAILABLE,
                    "NO_BASE_BACKUP",
                    "the first base backup is not complete yet; retry shortly",
                    retry_delay_s=5.0,
                )
            latest, archiving = await archive.latest(context)
            earliest = backups[0].finish_time
            if latest is None or not earliest <= as_of <= latest:
                window = f"{earliest.isoformat()} .. {(latest or earliest).isoformat()}"
                message = f"is outside the recoverable window {window} (GetRecoveryWindow)"
                raise invalid_argument([FieldViolation("as_of", message)])
            server = PointInTimeServer(folder, name, free_port())
            branch_id = await self._registry.reserve_server(
                name, as_of, server.port, deadline_timeout(context)
            )
            started = time.monotonic()
            work: asyncio.Future[None] | None = None
            try:
                if archiving:
                    await archive.archive_until_now(context)
                backup = [b for b in backups if b.finish_time <= as_of][-1]
                limit = max(1.0, min(_RESTORE_LIMIT_S, context.time_remaining() or _RESTORE_LIMIT_S))
                work = asyncio.ensure_future(
                    asyncio.to_thread(_restore_and_start, server, backup, as_of, limit)
                )
                await asyncio.shield(work)
                details = {
                    "origin": "point_in_time",
                    "as_of": as_of.isoformat(),
                    "base_backup": backup.name,
                    "port": server.port,
                }
                row = await self._registry.mark_ready(branch_id, name, details, deadline_timeout(context))
                if row is None:
                    raise no_branch(name)  # removed from the registry meanwhile
                self._servers[name] = server
                made = self._message(row)
                made.bytes = await asyncio.to_thread(folder.branch_bytes, name)
            except BaseException as exc:
                await to_the_end(self._discard(branch_id, server, work))
                if isinstance(exc, RuntimeError):
                    raise _restore_error(exc, server, archiving) from None
                raise
        _log.info(
            "point-in-time branch made",
            extra={
                "branch": name,
                "as_of": as_of.isoformat(),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return admin_pb2.CreateBranchResponse(branch=made)

    async def delete_branch(self, row: BranchRow, context: Context) -> None:
        """Stop a point-in-time branch's server, remove its folder, and forget it (audited)."""
        archive = self._archive
        await self._wait_started(context)
        name = row.name
        async with archive.lock:
            server = self._servers.pop(name, None) or PointInTimeServer(archive.folder, name, row.port or 0)
            await to_the_end(asyncio.to_thread(_stop_and_remove, server))
            as_of = row.as_of.isoformat() if row.as_of is not None else ""
            details = {"origin": row.origin, "as_of": as_of, "port": row.port}
            if not await self._registry.remove(row.id, name, details, deadline_timeout(context)):
                raise no_branch(name)

    async def describe(self, rows: list[BranchRow]) -> list[admin_pb2.Branch]:
        """Registry rows as Branch messages, point-in-time ones with their server's figures."""
        branches = [self._message(row) for row in rows]
        folder = self._archive.folder
        servers = [b for b in branches if b.origin == "point_in_time"]
        sizes = await asyncio.to_thread(lambda: [folder.branch_bytes(b.name) for b in servers])
        for branch, size in zip(servers, sizes, strict=True):
            branch.bytes = size
        return branches

    # -- helpers ---------------------------------------------------------------------

    def _message(self, row: BranchRow) -> admin_pb2.Branch:
        branch = branch_message(row)
        if row.origin == "point_in_time" and row.port is not None:
            server = self._servers.get(row.name)
            branch.address = f"127.0.0.1:{row.port}"
            branch.connection_string = service_url(row.port)
            branch.running = server is not None and server.running
        return branch

    async def _wait_started(self, context: Context) -> None:
        try:
            await asyncio.wait_for(self._started.wait(), deadline_timeout(context))
        except TimeoutError:
            raise StrataError(
                Code.UNAVAILABLE,
                "PITR_STARTING",
                "point-in-time recovery is still starting (its branches are being started again); retry",
                retry_delay_s=1.0,
            ) from None

    async def _discard(self, branch_id: int, server: PointInTimeServer, work: Awaitable[None] | None) -> None:
        """Undo a failed or cancelled restore: stop and remove its server, free its name; never raises."""
        try:
            if self._servers.get(server.name) is server:
                del self._servers[server.name]
            if work is not None:
                await asyncio.to_thread(server.stop)  # a start under way sees its postmaster exit
                with contextlib.suppress(BaseException):
                    await work
            await asyncio.to_thread(_stop_and_remove, server)
            await self._registry.release(branch_id, 30.0)
        except Exception:
            _log.exception("could not remove a failed point-in-time branch", extra={"branch": server.name})


def _restore_and_start(server: PointInTimeServer, backup: BaseBackup, as_of: datetime, limit: float) -> None:
    server.restore(backup, as_of)
    server.start(limit)


def _restart(server: PointInTimeServer) -> int:
    """Start a ready branch's server again (on another port if its own is taken); the port."""
    server.stop_leftover()
    if not port_is_free(server.port, reuse_address=True):
        server.port = free_port()
    server.start(120.0)
    return server.port


def _stop_and_remove(server: PointInTimeServer) -> None:
    server.stop()
    server.remove()


def _restore_error(exc: RuntimeError, server: PointInTimeServer, archiving: bool) -> StrataError:
    log = server.log_tail()
    _log.warning("a point-in-time restore failed", extra={"error": str(exc), "log": log})
    if _NOT_REACHED in log and not archiving:
        return StrataError(
            Code.FAILED_PRECONDITION,
            "AS_OF_NOT_ARCHIVED",
            "the archive ends before as_of, and the live server could not be asked to archive more",
        )
    return StrataError(
        Code.INTERNAL,
        "BRANCH_FAILED",
        "restoring the point-in-time branch failed; the admin service's log says why",
    )


def _checked_time(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise invalid_argument([FieldViolation(field, "is not a valid timestamp")])
    return value.ToDatetime(tzinfo=UTC)

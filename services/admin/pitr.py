"""Point-in-time recovery of the Postgres server Strata manages: the window, and branches at a time.

Only in embedded mode, where the launcher gives this process the PITR folder
(``STRATA_PITR_DIR``) and the primary archives its WAL there
(``shared.embedded``). Here:

- **Base backups.** One at start when there is none, then every
  ``STRATA_PITR_BASE_BACKUP_INTERVAL_S`` after the newest (a restart does not
  reset the clock). pg_basebackup runs as the owner role (and as Postgres's
  system user under root), into a ``.partial`` folder renamed when complete.
  The newest ``STRATA_PITR_KEEP_BASE_BACKUPS`` are kept, and the archived WAL
  from the oldest kept one's first segment on. An archive and backups left by
  another cluster (the primary was initialised anew) are moved aside.
- **The window.** From the oldest kept backup's finish to now, while the
  primary answers and archives here (see :meth:`PointInTime.recovery_window`).
- **Branches at a time.** Restored from the newest backup finished by
  ``as_of`` and run by this process (``shared.pitr.PointInTimeServer``):
  stopped when it stops; on start, ready ones are started again (any
  postmaster a killed predecessor left is stopped first) and unfinished ones
  removed. They are listed in ``admin.branches`` (origin ``point_in_time``)
  with their port, and audited like the other branches.

One lock orders what touches the archive or the branch folders: making or
deleting a branch and pruning wait for each other, so a restore never loses
its base backup or WAL half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from strata.admin.v1 import admin_pb2

from services.admin.backups import (
    DOMAIN,
    BranchRegistry,
    _no_branch,
    _Owner,
    _running,
    _to_the_end,
    _ToolFailed,
    branch_message,
    checked_name,
)
from shared.db import Database, deadline_timeout
from shared.embedded import archive_command
from shared.errors import FieldViolation, StrataError, invalid_argument
from shared.pitr import BaseBackup, PitrFolder, PointInTimeServer, folder_bytes, service_url
from shared.ports import free_port, port_is_free
from shared.settings import Settings
from shared.timestamps import to_timestamp

__all__ = ["PointInTime"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_ARCHIVE_WAIT_S = 30.0  # for the segment CreateBranch switched to be archived
_RESTORE_LIMIT_S = 3600.0  # replaying an interval's WAL; a call's deadline shortens it
_RETRY_S = 60.0  # after a failed base backup
_START_RETRY_S = 5.0  # after a failed start-up (the primary or the registry not answering yet)
_NOT_REACHED = "recovery ended before configured recovery target was reached"
# Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_log = logging.getLogger(__name__)


class PointInTime:
    """The WAL archive's base backups, the recoverable window, and the point-in-time branches' servers."""

    def __init__(
        self, db: Database, pitr_dir: str = "", owner_url: str = "", interval_s: float = 3600.0, keep: int = 2
    ) -> None:
        """``pitr_dir`` empty: not managed here (every call but listing is FAILED_PRECONDITION)."""
        self._folder = PitrFolder(Path(pitr_dir)) if pitr_dir else None
        self._owner = _Owner.parse(owner_url) if owner_url else None
        self._interval_s = interval_s
        self._keep = keep
        self._registry = BranchRegistry(db)
        self._servers: dict[str, PointInTimeServer] = {}
        self._lock = asyncio.Lock()  # the archive and branch folders (see the module docstring)
        self._backing_up = asyncio.Lock()  # one base backup at a time
        self._started = asyncio.Event()  # folders ready and branches started again
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, db: Database) -> PointInTime:
        """Managed when ``settings.pitr_dir`` is set (the launcher sets it in embedded mode)."""
        return cls(
            db,
            settings.pitr_dir,
            settings.migrate_database_url,
            settings.pitr_base_backup_interval_s,
            settings.pitr_keep_base_backups,
        )

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work (folders, branches from before, base backups) when PITR is managed."""
        if self._folder is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        """Stop the background work (killing a base backup under way) and every branch's server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        servers = list(self._servers.values())
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers), return_exceptions=True)

    async def _maintain(self) -> None:
        folder = self._managed()
        while not self._started.is_set():
            try:
                await self._start_up(folder)
                self._started.set()
            except Exception:
                _log.exception("point-in-time recovery could not start; retrying")
                await asyncio.sleep(_START_RETRY_S)
        while True:
            try:
                delay = await self._backup_if_due(folder)
            except Exception:
                _log.exception("the base backup failed; retrying")
                delay = min(_RETRY_S, self._interval_s)
            await asyncio.sleep(delay)

    async def _start_up(self, folder: PitrFolder) -> None:
        await asyncio.to_thread(folder.prepare)  # from here on the primary archives
        await asyncio.to_thread(folder.remove_partials)
        await self._check_cluster(folder, self._owner_role())
        timeout = 30.0
        known: set[str] = set()
        for row in await self._registry.servers(timeout):
            name = row["name"]
            server = PointInTimeServer(folder, name, row["port"])
            if not row["ready"]:  # its making was interrupted: nothing to keep
                await asyncio.to_thread(_stop_and_remove, server)
                await self._registry.release(row["id"], timeout)
                continue
            known.add(name)
            self._servers[name] = server
            if not server.pgdata.is_dir():
                _log.error("a point-in-time branch's folder is missing", extra={"branch": name})
                continue
            try:
                port = await asyncio.to_thread(_restart, server)
            except RuntimeError:
                _log.exception(
                    "a point-in-time branch did not start", extra={"branch": name, "log": server.log_tail()}
                )
                continue
            if port != row["port"]:
                await self._registry.move(row["id"], port, timeout)
                _log.warning(
                    "a point-in-time branch moved to another port", extra={"branch": name, "port": port}
                )
        for entry in await asyncio.to_thread(folder.branch_folders):
            if entry.endswith(".partial"):  # a copy cut short
                await asyncio.to_thread(folder.remove_branch_folder, entry)
            elif entry not in known:  # no registered branch (forgotten while its server was being removed)
                await asyncio.to_thread(_stop_and_remove, PointInTimeServer(folder, entry, 0))

    async def _backup_if_due(self, folder: PitrFolder) -> float:
        """Take a base backup if the newest is older than the interval; seconds until the next is due."""
        backups = await asyncio.to_thread(folder.base_backups)
        if backups:
            due = backups[-1].finish_time + timedelta(seconds=self._interval_s)
            wait = (due - datetime.now(UTC)).total_seconds()
            if wait > 0:
                return wait
        await self.take_base_backup()
        return self._interval_s

    async def take_base_backup(self) -> BaseBackup:
        """Take a base backup now, then keep only the newest ones and the WAL they need; the new backup."""
        folder, owner = self._managed(), self._owner_role()
        async with self._backing_up:
            await self._check_cluster(folder, owner)
            started = time.monotonic()
            partial = await asyncio.to_thread(folder.partial_backup)
            argv = folder.base_backup_command(partial, owner.conninfo(owner.database))
            try:
                async with _running(argv[0], argv[1:], owner.env("strata-pitr"), group=True) as tool:
                    await tool.wait()
                backup = await asyncio.to_thread(folder.complete, partial)
            except BaseException as exc:
                await _to_the_end(asyncio.to_thread(folder.remove_partials))
                if isinstance(exc, _ToolFailed):
                    raise RuntimeError(f"pg_basebackup failed: {exc.stderr}") from None
                raise
            async with self._lock:
                removed, segments = await asyncio.to_thread(folder.prune, self._keep)
        _log.info(
            "base backup taken",
            extra={
                "backup": backup.name,
                "seconds": round(time.monotonic() - started, 3),
                "removed_backups": removed,
                "removed_segments": segments,
            },
        )
        return backup

    async def _check_cluster(self, folder: PitrFolder, owner: _Owner) -> None:
        """Make the archive this primary's: clear it before a first backup; move aside another cluster's."""
        backups = await asyncio.to_thread(folder.base_backups)
        if not backups:
            # Without a base backup nothing in it can be restored from, and a
            # segment of another cluster there would block archiving.
            async with self._lock:
                await asyncio.to_thread(folder.clear_archive)
            return
        async with owner.connect() as conn:
            primary = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
        primary = int(primary) % (1 << 64)  # signed in SQL, unsigned in pg_control
        if await asyncio.to_thread(folder.identifier, backups[-1]) != primary:
            async with self._lock:
                aside = await asyncio.to_thread(folder.retire)
            _log.warning(
                "the WAL archive and base backups belong to another cluster; moved aside",
                extra={"folder": str(aside)},
            )

    # -- calls -----------------------------------------------------------------------

    async def recovery_window(self, context: Context) -> admin_pb2.GetRecoveryWindowResponse:
        """The window CreateBranch's ``as_of`` must fall in, the kept base backups and the archive's state."""
        folder = self._managed()
        await self._wait_started(context)
        backups = await asyncio.to_thread(folder.base_backups)
        response = admin_pb2.GetRecoveryWindowResponse(
            base_backups=[
                admin_pb2.BaseBackup(
                    name=b.name,
                    finish_time=to_timestamp(b.finish_time),
                    start_wal=b.start_segment,
                    bytes=await asyncio.to_thread(folder_bytes, b.path),
                )
                for b in backups
            ],
            archive_bytes=await asyncio.to_thread(folder.archive_bytes),
        )
        newest = await asyncio.to_thread(folder.newest_segment)
        if newest is not None:
            response.last_archived_wal = newest[0]
            response.last_archive_time.FromDatetime(newest[1])
        if backups:
            latest, _ = await self._latest(folder, context)
            response.earliest_time.FromDatetime(backups[0].finish_time)
            if latest is not None:
                response.latest_time.FromDatetime(max(latest, backups[0].finish_time))
        return response

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        """A new server restored to ``request.as_of``, started, promoted and registered (audited)."""
        name = checked_name(request.name, "name")
        as_of = _checked_time(request.as_of, "as_of")
        folder, owner = self._managed(), self._owner_role()
        await self._wait_started(context)
        async with self._lock:
            backups = await asyncio.to_thread(folder.base_backups)
            if not backups:
                raise StrataError(
                    grpc.StatusCode.UNAVAILABLE,
                    "NO_BASE_BACKUP",
                    "the first base backup is not complete yet; retry shortly",
                    domain=DOMAIN,
                    retry_delay_s=5.0,
                )
            latest, archiving = await self._latest(folder, context)
            earliest = backups[0].finish_time
            if latest is None or not earliest <= as_of <= latest:
                window = f"{earliest.isoformat()} .. {(latest or earliest).isoformat()}"
                message = f"is outside the recoverable window {window} (GetRecoveryWindow)"
                raise invalid_argument([FieldViolation("as_of", message)], domain=DOMAIN)
            server = PointInTimeServer(folder, name, free_port())
            branch_id = await self._registry.reserve_server(
                name, as_of, server.port, deadline_timeout(context)
            )
            started = time.monotonic()
            work: asyncio.Future[None] | None = None
            try:
                if archiving:
                    await self._archive_until_now(folder, owner, context)
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
                    raise _no_branch(name)  # removed from the registry meanwhile
                self._servers[name] = server
                made = self._message(row)
                made.bytes = await asyncio.to_thread(folder.branch_bytes, name)
            except BaseException as exc:
                await _to_the_end(self._discard(branch_id, server, work))
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

    async def delete_branch(self, row: asyncpg.Record, context: Context) -> None:
        """Stop a point-in-time branch's server, remove its folder, and forget it (audited)."""
        folder = self._managed()
        await self._wait_started(context)
        name = row["name"]
        async with self._lock:
            server = self._servers.pop(name, None) or PointInTimeServer(folder, name, row["port"])
            await _to_the_end(asyncio.to_thread(_stop_and_remove, server))
            details = {"origin": row["origin"], "as_of": row["as_of"].isoformat(), "port": row["port"]}
            if not await self._registry.remove(row["id"], name, details, deadline_timeout(context)):
                raise _no_branch(name)

    async def describe(self, rows: list[asyncpg.Record]) -> list[admin_pb2.Branch]:
        """Registry rows as Branch messages, point-in-time ones with their server's figures."""
        branches = [self._message(row) for row in rows]
        folder = self._folder
        if folder is not None:
            servers = [b for b in branches if b.origin == "point_in_time"]
            sizes = await asyncio.to_thread(lambda: [folder.branch_bytes(b.name) for b in servers])
            for branch, size in zip(servers, sizes, strict=True):
                branch.bytes = size
        return branches

    # -- helpers ---------------------------------------------------------------------

    def _message(self, row: asyncpg.Record) -> admin_pb2.Branch:
        branch = branch_message(row)
        if row["origin"] == "point_in_time":
            server = self._servers.get(row["name"])
            branch.address = f"127.0.0.1:{row['port']}"
            branch.connection_string = service_url(row["port"])
            branch.running = server is not None and server.running
        return branch

    def _managed(self) -> PitrFolder:
        if self._folder is None:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "PITR_NOT_MANAGED",
                "point-in-time recovery belongs to the provider of the Postgres server (DATABASE_URL): "
                "Strata archives WAL and branches at a time only the server it runs (embedded mode)",
                domain=DOMAIN,
            )
        return self._folder

    def _owner_role(self) -> _Owner:
        if self._owner is None:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "base backups run as the database owner role, and this admin process has none: "
                "set STRATA_MIGRATE_DATABASE_URL",
                domain=DOMAIN,
            )
        return self._owner

    async def _wait_started(self, context: Context) -> None:
        try:
            await asyncio.wait_for(self._started.wait(), deadline_timeout(context))
        except TimeoutError:
            raise StrataError(
                grpc.StatusCode.UNAVAILABLE,
                "PITR_STARTING",
                "point-in-time recovery is still starting (its branches are being started again); retry",
                domain=DOMAIN,
                retry_delay_s=1.0,
            ) from None

    async def _latest(self, folder: PitrFolder, context: Context) -> tuple[datetime | None, bool]:
        """The latest recoverable time, and whether the primary answers and archives here.

        While it does, that is now: CreateBranch archives the WAL up to its
        start. Otherwise, when the newest segment was archived (None when
        none is). FAILED_PRECONDITION when the primary answers but archives
        elsewhere, or not at all.
        """
        owner = self._owner_role()
        try:
            async with owner.connect() as conn:
                row = await conn.fetchrow(
                    "SELECT now() AS now, current_setting('archive_mode') AS mode, "
                    "current_setting('archive_command') AS command, "
                    "last_archived_time, last_failed_time, last_failed_wal FROM pg_stat_archiver",
                    timeout=deadline_timeout(context, 5.0),
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _log.warning(
                "the primary did not answer; the window ends at the archive", extra={"error": str(exc)}
            )
            row = None
        if row is not None:
            if row["mode"] != "on" or row["command"] != archive_command(folder.wal):
                raise StrataError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "WAL_NOT_ARCHIVED",
                    "the Postgres server does not archive its WAL into this admin process's folder "
                    "(STRATA_PITR_DIR): it was started without archiving; restart Strata",
                    domain=DOMAIN,
                )
            failed, archived = row["last_failed_time"], row["last_archived_time"]
            if failed is None or (archived is not None and archived >= failed):
                return row["now"], True
            _log.warning("WAL archiving is failing", extra={"segment": row["last_failed_wal"]})
        newest = await asyncio.to_thread(folder.newest_segment)
        return (newest[1] if newest else None), False

    async def _archive_until_now(self, folder: PitrFolder, owner: _Owner, context: Context) -> None:
        """Commit a marker, switch the WAL segment, and wait until it is archived.

        Recovery stops at the first commit after its target and fails if
        none is archived, so the marker makes every time up to now reachable.
        """
        async with owner.connect() as conn:
            await conn.execute("SELECT pg_current_xact_id()")  # assigns an xid: its commit is logged
            segment = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + deadline_timeout(context, _ARCHIVE_WAIT_S)
        while not await asyncio.to_thread(folder.archived, segment):
            if time.monotonic() > deadline:
                raise StrataError(
                    grpc.StatusCode.UNAVAILABLE,
                    "ARCHIVE_BEHIND",
                    f"WAL segment {segment} was not archived in time; retry (Postgres's log says why)",
                    domain=DOMAIN,
                    retry_delay_s=5.0,
                    metadata={"segment": segment},
                )
            await asyncio.sleep(0.02)

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
    server._stop_leftover()
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
            grpc.StatusCode.FAILED_PRECONDITION,
            "AS_OF_NOT_ARCHIVED",
            "the archive ends before as_of, and the live server could not be asked to archive more",
            domain=DOMAIN,
        )
    return StrataError(
        grpc.StatusCode.INTERNAL,
        "BRANCH_FAILED",
        "restoring the point-in-time branch failed; the admin service's log says why",
        domain=DOMAIN,
    )


def _checked_time(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise invalid_argument([FieldViolation(field, "is not a valid timestamp")], domain=DOMAIN)
    return value.ToDatetime(tzinfo=UTC)

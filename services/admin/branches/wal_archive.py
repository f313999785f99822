"""The WAL archive of the Postgres server Strata manages: its base backups and the recoverable window.

Only in embedded mode, where the launcher gives the admin process the PITR
folder (``STRATA_PITR_DIR``) and the primary archives its WAL there
(``devstack.embedded``):

- **Base backups.** One at start when there is none, then every
  ``STRATA_PITR_BASE_BACKUP_INTERVAL_S`` after the newest (a restart does not
  reset the clock). pg_basebackup runs as the owner role (and as Postgres's
  system user under root), into a ``.partial`` folder renamed when complete.
  The newest ``STRATA_PITR_KEEP_BASE_BACKUPS`` are kept, and the archived WAL
  from the oldest kept one's first segment on. An archive and backups left by
  another cluster (the primary was initialised anew) are moved aside.
- **The window.** From the oldest kept backup's finish to now, while the
  primary answers and archives here (see :meth:`WalArchive.latest`).

:attr:`WalArchive.lock` orders what touches the archive or the branch folders:
making or deleting a point-in-time branch (:mod:`.pitr`) and pruning wait for
each other, so a restore never loses its base backup or WAL half-way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg
from strata.admin.v1 import admin_pb2

from devstack.pitr import BaseBackup, PitrFolder, folder_bytes
from devstack.postgres import archive_command
from services.admin.branches.owner import OwnerRole
from services.admin.branches.tools import ToolFailed, running, to_the_end
from shared.api.errors import Code, StrataError
from shared.api.timestamps import to_timestamp
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["WalArchive"]

_ARCHIVE_WAIT_S = 30.0  # for the segment CreateBranch switched to be archived
_RETRY_S = 60.0  # after a failed base backup
_log = logging.getLogger(__name__)


class WalArchive:
    """The PITR folder's base backups and archived WAL, kept by one admin process."""

    def __init__(self, folder: PitrFolder, owner: OwnerRole | None, interval_s: float, keep: int) -> None:
        """``owner``: the role pg_basebackup runs as (None: every call is FAILED_PRECONDITION)."""
        self.folder = folder
        self._owner = owner
        self._interval_s = interval_s
        self._keep = keep
        self.lock = asyncio.Lock()  # the archive and branch folders (see the module docstring)
        self._backing_up = asyncio.Lock()  # one base backup at a time

    def owner_role(self) -> OwnerRole:
        """The owner role; FAILED_PRECONDITION when this process has none."""
        if self._owner is None:
            raise StrataError(
                Code.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "base backups run as the database owner role, and this admin process has none: "
                "set STRATA_MIGRATE_DATABASE_URL",
            )
        return self._owner

    async def keep_backing_up(self) -> None:
        """Take base backups on schedule, forever (until cancelled); a failure is retried."""
        while True:
            try:
                delay = await self._backup_if_due()
            except Exception:
                _log.exception("the base backup failed; retrying")
                delay = min(_RETRY_S, self._interval_s)
            await asyncio.sleep(delay)

    async def _backup_if_due(self) -> float:
        """Take a base backup if the newest is older than the interval; seconds until the next is due."""
        backups = await asyncio.to_thread(self.folder.base_backups)
        if backups:
            due = backups[-1].finish_time + timedelta(seconds=self._interval_s)
            wait = (due - datetime.now(UTC)).total_seconds()
            if wait > 0:
                return wait
        await self.take_base_backup()
        return self._interval_s

    async def take_base_backup(self) -> BaseBackup:
        """Take a base backup now, then keep only the newest ones and the WAL they need; the new backup."""
        folder, owner = self.folder, self.owner_role()
        async with self._backing_up:
            await self.check_cluster()
            started = time.monotonic()
            partial = await asyncio.to_thread(folder.partial_backup)
            argv = folder.base_backup_command(partial, owner.conninfo(owner.database))
            try:
                async with running(argv[0], argv[1:], owner.env("strata-pitr"), group=True) as tool:
                    await tool.wait()
                backup = await asyncio.to_thread(folder.complete, partial)
            except BaseException as exc:
                await to_the_end(asyncio.to_thread(folder.remove_partials))
                if isinstance(exc, ToolFailed):
                    raise RuntimeError(f"pg_basebackup failed: {exc.stderr}") from None
                raise
            async with self.lock:
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

    async def check_cluster(self) -> None:
        """Make the archive this primary's: clear it before a first backup; move aside another cluster's."""
        folder = self.folder
        backups = await asyncio.to_thread(folder.base_backups)
        if not backups:
            # Without a base backup nothing in it can be restored from, and a
            # segment of another cluster there would block archiving.
            async with self.lock:
                await asyncio.to_thread(folder.clear_archive)
            return
        async with self.owner_role().connect() as conn:
            primary = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
        primary = int(primary) % (1 << 64)  # signed in SQL, unsigned in pg_control
        if await asyncio.to_thread(folder.identifier, backups[-1]) != primary:
            async with self.lock:
                aside = await asyncio.to_thread(folder.retire)
            _log.warning(
                "the WAL archive and base backups belong to another cluster; moved aside",
                extra={"folder": str(aside)},
            )

    async def window(self, context: Context) -> admin_pb2.GetRecoveryWindowResponse:
        """The window CreateBranch's ``as_of`` must fall in, the kept base backups and the archive's state."""
        folder = self.folder
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
            latest, _ = await self.latest(context)
            response.earliest_time.FromDatetime(backups[0].finish_time)
            if latest is not None:
                response.latest_time.FromDatetime(max(latest, backups[0].finish_time))
        return response

    async def latest(self, context: Context) -> tuple[datetime | None, bool]:
        """The latest recoverable time, and whether the primary answers and archives here.

        While it does, that is now: CreateBranch archives the WAL up to its
        start. Otherwise, when the newest segment was archived (None when
        none is). FAILED_PRECONDITION when the primary answers but archives
        elsewhere, or not at all.
        """
        owner = self.owner_role()
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
            if row["mode"] != "on" or row["command"] != archive_command(self.folder.wal):
                raise StrataError(
                    Code.FAILED_PRECONDITION,
                    "WAL_NOT_ARCHIVED",
                    "the Postgres server does not archive its WAL into this admin process's folder "
                    "(STRATA_PITR_DIR): it was started without archiving; restart Strata",
                )
            failed, archived = row["last_failed_time"], row["last_archived_time"]
            if failed is None or (archived is not None and archived >= failed):
                return row["now"], True
            _log.warning("WAL archiving is failing", extra={"segment": row["last_failed_wal"]})
        newest = await asyncio.to_thread(self.folder.newest_segment)
        return (newest[1] if newest else None), False

    async def archive_until_now(self, context: Context) -> None:
        """Commit a marker, switch the WAL segment, and wait until it is archived.

        Recovery stops at the first commit after its target and fails if
        none is archived, so the marker makes every time up to now reachable.
        """
        async with self.owner_role().connect() as conn:
            await conn.execute("SELECT pg_current_xact_id()")  # assigns an xid: its commit is logged
            segment = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + deadline_timeout(context, _ARCHIVE_WAIT_S)
        while not await asyncio.to_thread(self.folder.archived, segment):
            if time.monotonic() > deadline:
                raise StrataError(
                    Code.UNAVAILABLE,
                    "ARCHIVE_BEHIND",
                    f"WAL segment {segment} was not archived in time; retry (Postgres's log says why)",
                    retry_delay_s=5.0,
                    metadata={"segment": segment},
                )
            await asyncio.sleep(0.02)

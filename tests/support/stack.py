"""Real Strata processes for end-to-end tests: the launcher in external mode, and lone gateways.

:func:`start_stack` runs ``python -m devstack.launcher`` exactly as ``make run``
does, but against the session's test Postgres and Redis (external mode), on
free ports, exporting traces to a given OTLP receiver. :func:`start_gateway`
starts one more gateway process in front of a stack, with its own settings
(rate limits, TLS), for tests that need them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from devstack.launcher import LaunchedStrata, launch
from devstack.ports import free_port
from devstack.roles import RolesProcess, roles_environment
from devstack.roles import start_roles as start_roles_process
from shared.config.settings import Settings
from tests.conftest import PROJECT_ROOT, TEST_INTERNAL_SECRET

TEST_KEY_PEPPER = "test-key-pepper-not-for-production"
GRPCURL = str(PROJECT_ROOT / ".venv" / "bin" / "grpcurl")


@dataclass
class Stack:
    """A running launcher: its ports, environment and dev (admin) key."""

    launched: LaunchedStrata
    data_dir: Path
    env: dict[str, str]
    ports: dict[str, int]
    api_key: str

    @property
    def process(self) -> asyncio.subprocess.Process:
        return self.launched.process

    @property
    def output(self) -> list[str]:
        return self.launched.output

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    async def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        return await self.launched.stop()


def stack_environment(
    settings: Settings, otlp_port: int | None, **extra: str
) -> tuple[dict[str, str], dict[str, int]]:
    """The environment of a launcher against the test backends, and its ports."""
    ports = {name: free_port() for name in ("gateway", "kv", "tenants", "vector", "admin")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "OTEL_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        STRATA_MIGRATE_DATABASE_URL=settings.migrate_database_url,
        STRATA_INTERNAL_SECRET=TEST_INTERNAL_SECRET,
        STRATA_KEY_PEPPER=TEST_KEY_PEPPER,
        # Processes publish their figures often, so admin's view is fresh within a test.
        STRATA_STATS_INTERVAL_S="0.3",
        # Every test calls from 127.0.0.1, and the hostile suites fail to authenticate on
        # purpose: the per-address limit is tested on a gateway of its own.
        STRATA_AUTH_FAILURES_PER_PEER_BURST="1000000",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"STRATA_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env.update({f"STRATA_{name.upper()}_METRICS_PORT": str(free_port()) for name in ports})
    if otlp_port is not None:
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
    env.update(extra)
    return env, ports


async def start_stack(settings: Settings, otlp_port: int | None = None, **extra: str) -> Stack:
    """Start the launcher and wait until it reports everything running."""
    env, ports = stack_environment(settings, otlp_port, **extra)
    data_dir = PROJECT_ROOT / ".strata" / f"stack-{uuid.uuid4().hex[:8]}"
    env["STRATA_DATA_DIR"] = str(data_dir)
    try:
        launched = await launch(env, PROJECT_ROOT, timeout=90)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None
    return Stack(launched, data_dir, env, ports, (data_dir / "dev-api-key").read_text().strip())


async def start_gateway(stack: Stack, **extra: str) -> tuple[asyncio.subprocess.Process, int]:
    """One more gateway in front of ``stack``'s services, with ``extra`` settings; (process, port)."""
    upstreams = {
        "STRATA_KV_UPSTREAMS": f"127.0.0.1:{stack.ports['kv']}",
        "STRATA_ADMIN_UPSTREAMS": f"127.0.0.1:{stack.ports['admin']}",
    }
    return await start_process(stack, "gateway", **{**upstreams, **extra})


async def start_process(stack: Stack, name: str, **extra: str) -> tuple[asyncio.subprocess.Process, int]:
    """One more process of service ``name`` (or the gateway) beside ``stack``'s, with ``extra``
    settings, on a port of its own; (process, port)."""
    port = free_port()
    env = dict(stack.env)
    env.update(
        {
            f"STRATA_{name.upper()}_PORT": str(port),
            # The stack's process of this name holds its own metrics port.
            f"STRATA_{name.upper()}_METRICS_PORT": str(free_port()),
        }
    )
    env.update(extra)
    module = "gateway" if name == "gateway" else f"services.{name}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(f"READY {name}".encode()):
        process.kill()
        raise AssertionError(f"{name} did not start: {line!r}")
    return process, port


def run_to_exit(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m module`` with ``env`` (in a session of its own), run to its exit; output captured."""
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def grpcurl(
    stack: Stack, method: str, body: dict[str, object], *extra: str, api_key: str | None = None
) -> tuple[int, str]:
    """Call ``method`` through ``stack``'s gateway with the real grpcurl; (exit code, output).

    As the stack's dev key unless ``api_key`` is given; ``extra`` goes before the body (``-v``).
    """
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-H",
        f"authorization: Bearer {api_key or stack.api_key}",
        *extra,
        "-d",
        json.dumps(body),
        stack.gateway,
        method,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode()


def remove_data(stack: Stack) -> None:
    shutil.rmtree(stack.data_dir, ignore_errors=True)


async def start_roles(
    stack: Stack, roles: str, *, env: dict[str, str] | None = None, ports: dict[str, int] | None = None
) -> RolesProcess:
    """A ``python -m roles`` process on ``stack``'s backends and secrets (or on ``env`` and ``ports``)."""
    if env is None or ports is None:
        env, ports = roles_environment(stack.env, roles)
    return await start_roles_process(env, ports, PROJECT_ROOT)

"""``make run``: Postgres, Redis, migrations and every service, in the foreground.

Starts the backends (embedded unless URLs are given, see devstack.backends),
then each service as its own process, waits until each reports its port, and
prints the addresses. A service that dies is restarted with backoff. Ctrl-C
or SIGTERM stops the services (each drains its calls), then the backends.

Adding a service is one entry in :data:`SERVICES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import uvloop
from strata.admin.v1 import admin_pb2, admin_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from devstack.backends import Backends, open_backends
from shared.api.apikeys import parse_api_key
from shared.api.callers import OPERATOR_SCOPE, Caller
from shared.config.secret_files import stored_secret
from shared.config.settings import ConfigError, Settings, load_settings
from shared.observability.logs import configure_logging
from shared.rpc.identity import signing_interceptors
from shared.rpc.tls import internal_channel

__all__ = ["SERVICES", "LaunchedStrata", "ServiceProcess", "launch", "main"]

# Service name → module run as ``python -m``; the name is also its schema,
# its migrations folder (services/<name>/migrations) and its port setting.
SERVICES: dict[str, str] = {
    "kv": "services.kv",
    "tenants": "services.tenants",
    "vector": "services.vector",
    "admin": "services.admin",
    "gateway": "gateway",  # last: it checks the others' health
}

_log = logging.getLogger("strata.launcher")
DEV_KEY_FILE = "dev-api-key"
_READY_TIMEOUT_S = 60.0
_READY_LINE = "Press Ctrl-C to stop."  # the last line of the start-up banner
_PORT_STRIDE = 100  # process i of a service listens on its port + 100 x i
_LOCAL_CACHE = "STRATA_CACHE_LOCAL_ENTRIES"


class ServiceProcess:
    """One supervised service process."""

    def __init__(self, name: str, module: str, env: dict[str, str], *, label: str = "") -> None:
        self.name = name
        self.label = label or name  # "kv", "kv-2", ...: which process of the service
        self.module = module
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.address = ""
        self.restarts = 0
        self._stopping = False
        self._forwarder: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Start the process and wait for its READY line; return its address."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                await self.stop()
                raise RuntimeError(f"{self.name} did not become ready in {_READY_TIMEOUT_S:.0f}s") from None
            if not line:
                code = await self.process.wait()
                raise RuntimeError(f"{self.name} exited with code {code} before it was ready")
            text = line.decode(errors="replace").strip()
            if text.startswith(f"READY {self.name} "):
                self.address = text.split(" ", 2)[2]
                break
            print(f"[{self.label}] {text}", flush=True)
        self._forwarder = asyncio.create_task(self._forward_stdout())
        return self.address

    async def _forward_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            print(f"[{self.label}] {line.decode(errors='replace').rstrip()}", flush=True)

    async def supervise(self) -> None:
        """Restart the process whenever it dies, until :meth:`stop`."""
        delay = 0.5
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            self.restarts += 1
            _log.error("service exited; restarting", extra={"service": self.label, "code": code})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            with contextlib.suppress(RuntimeError):
                await self.start()
                delay = 0.5

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s for the drain, then SIGKILL; the exit code."""
        self._stopping = True
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._forwarder is not None:
            with contextlib.suppress(Exception):
                await self._forwarder
        return code


async def ensure_dev_api_key(
    settings: Settings, env: dict[str, str], processes: list[ServiceProcess]
) -> tuple[str, bool]:
    """The dev API key, made through the admin service on first start and kept in ``<data>/dev-api-key``;
    and whether it was made just now."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / DEV_KEY_FILE
    if path.exists():
        return path.read_text().strip(), False
    address = {p.name: p.address for p in processes}
    launcher = signing_interceptors(
        env["STRATA_INTERNAL_SECRET"].encode(), Caller("dev", frozenset({OPERATOR_SCOPE}), "launcher")
    )
    async with internal_channel(settings, address["tenants"], interceptors=launcher) as channel:
        try:
            await tenants_pb2_grpc.TenantServiceStub(channel).CreateTenant(
                tenants_pb2.CreateTenantRequest(
                    tenant=tenants_pb2.Tenant(slug="dev", display_name="Development (make run)")
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    async with internal_channel(settings, address["admin"], interceptors=launcher) as channel:
        made = await admin_pb2_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant="dev", name="dev key (make run)", scopes=[OPERATOR_SCOPE]),
            timeout=10,
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(made.api_key + "\n")
    return str(made.api_key), True


def _redacted(api_key: str) -> str:
    """``sk_<id>_…``: enough to tell which key it is, nothing that authenticates."""
    parsed = parse_api_key(api_key)
    return f"sk_{parsed[0]}_…" if parsed is not None else "…"


def service_processes(settings: Settings, env: dict[str, str]) -> list[ServiceProcess]:
    """Every process to start, in order: ``STRATA_<SERVICE>_REPLICAS`` of each service.

    Process i (from 0) of a service listens on its port + 100 x i, and so does
    its metrics port, if set; the gateway's processes share one port (the
    kernel spreads connections over them, SO_REUSEPORT). Unless the
    environment names them, every process is told where all processes of
    each service are (``STRATA_<SERVICE>_UPSTREAMS``): the gateway balances
    over them, admin checks each, tenants reaches kv and admin.
    """
    addresses = {
        name: [f"127.0.0.1:{settings.port_of(name) + _PORT_STRIDE * i}" for i in range(count)]
        for name in SERVICES
        if name != "gateway" and (count := settings.processes_of(name))
    }
    shared_env = dict(env)
    for name, found in addresses.items():
        variable = f"STRATA_{name.upper()}_UPSTREAMS"
        if len(found) > 1 and variable not in env:
            shared_env[variable] = ",".join(found)
    processes = []
    for name, module in SERVICES.items():
        for i in range(settings.processes_of(name)):
            offset = 0 if name == "gateway" else _PORT_STRIDE * i
            own = {f"STRATA_{name.upper()}_PORT": str(settings.port_of(name) + offset)}
            if settings.processes_of(name) > 1 and _LOCAL_CACHE not in env:
                # Another process's write reaches this one's in-process tier only
                # through pub/sub, some time after it is acknowledged (never, while
                # Redis is down): with several processes, every cached read asks Redis.
                own[_LOCAL_CACHE] = "0"
            metrics = settings.metrics_port_of(name)
            if metrics:
                own[f"STRATA_{name.upper()}_METRICS_PORT"] = str(metrics + _PORT_STRIDE * i)
            label = name if i == 0 else f"{name}-{i + 1}"
            processes.append(ServiceProcess(name, module, {**shared_env, **own}, label=label))
    return processes


def service_environment(settings: Settings, backends: Backends) -> dict[str, str]:
    """The environment every service process gets: the caller's, the backends' URLs, the shared secrets.

    ``DATABASE_READ_URLS`` (comma-separated) names the backends' read replicas, if any.

    Secrets not given in the environment are generated once under
    ``<data>/secrets`` (the key pepper must outlive restarts: key hashes depend on it).
    """
    folder = settings.data_dir / "secrets"
    env = dict(os.environ)
    env.update(
        DATABASE_URL=backends.database_url,
        REDIS_URL=backends.redis_url,
        STRATA_DATA_DIR=str(settings.data_dir),
        STRATA_INTERNAL_SECRET=settings.internal_secret or stored_secret(folder, "internal-secret"),
    )
    env.pop("STRATA_MIGRATE_DATABASE_URL", None)  # the owner's URL goes to admin alone
    env.pop("STRATA_KEY_PEPPER", None)  # so does the key pepper: only admin hashes key secrets
    env.pop("STRATA_PITR_DIR", None)  # set for admin alone, and only when Strata runs the Postgres
    # The replicas of these backends, or none: a caller's DATABASE_READ_URLS
    # could name replicas of another primary in embedded mode.
    env.pop("DATABASE_READ_URLS", None)
    if backends.database_read_urls:
        env["DATABASE_READ_URLS"] = ",".join(backends.database_read_urls)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run(settings: Settings) -> None:
    """Start everything, print the addresses, and serve until a stop signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    mode = "embedded" if settings.embedded else "external"
    print(f"Strata: starting ({mode} Postgres and Redis, data in {settings.data_dir})", flush=True)
    backends = await open_backends(settings, tuple(SERVICES))
    env = service_environment(settings, backends)
    processes = service_processes(settings, env)
    supervisors: list[asyncio.Task[None]] = []
    try:
        for service in processes:
            if service.name == "admin":
                # The operator's service: migrations, backups and branches need the owner role,
                # and it alone issues and checks API keys.
                service.env["STRATA_MIGRATE_DATABASE_URL"] = backends.migrate_database_url
                service.env["STRATA_KEY_PEPPER"] = settings.key_pepper or stored_secret(
                    settings.data_dir / "secrets", "key-pepper"
                )
                if backends.postgres is not None:
                    # Strata manages this Postgres: its WAL archive and base backups live here.
                    service.env["STRATA_PITR_DIR"] = str(settings.data_dir / "pitr")
            await service.start()
            supervisors.append(asyncio.create_task(service.supervise()))
        api_key, made_now = await ensure_dev_api_key(settings, env, processes)
        print("Strata is running:", flush=True)
        for service in processes:
            print(f"  {service.label:<8} {service.address}", flush=True)
        if settings.embedded:
            print(
                f"  postgres 127.0.0.1:{settings.embedded_pg_port} (secrets in {settings.data_dir}/secrets)"
            )
            print(f"  redis    127.0.0.1:{settings.embedded_redis_port}")
            for replica in backends.replicas:
                print(f"  {f'replica{replica.number}':<8} 127.0.0.1:{replica.port} (read-only, streaming)")
        # The whole key is shown once, when it is made; output is often kept in logs.
        shown = api_key if made_now else _redacted(api_key)
        print(f"Dev API key (operator scope, tenant 'dev'): {shown}", flush=True)
        print(f"  saved in {settings.data_dir / DEV_KEY_FILE}; call the gateway with", flush=True)
        plaintext = "" if settings.tls_cert_file else "-plaintext "  # the gateway speaks TLS only with a cert
        print(
            f'  grpcurl {plaintext}-H "authorization: Bearer $(cat {settings.data_dir / DEV_KEY_FILE})" ...',
            flush=True,
        )
        print(_READY_LINE, flush=True)
        await stop.wait()
        print("Strata: stopping", flush=True)
    finally:
        # The gateway first: it drains calls it accepted while the services still answer them.
        codes: list[object] = [await p.stop() for p in processes if p.name == "gateway"]
        codes.extend(
            await asyncio.gather(
                *(p.stop() for p in processes if p.name != "gateway"), return_exceptions=True
            )
        )
        for task in supervisors:
            task.cancel()
        backends.close()
        print(f"Strata: stopped (service exit codes: {codes})", flush=True)


class LaunchedStrata:
    """A launcher started by :func:`launch` (tests, benchmarks, the soak): its output and its children."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output: list[str] = []  # every line it printed so far (its services' lines included)
        self._reader: asyncio.Task[None] | None = None

    async def _read(self, until_ready: bool) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode(errors="replace").rstrip())
            if until_ready and self.output[-1].startswith(_READY_LINE):
                return
        if until_ready:
            raise EOFError("the launcher exited before it was ready")

    def pids(self) -> dict[str, int]:
        """The pid of a running process of each service (by :data:`SERVICES` name), from /proc."""
        return {name: found[0] for name, found in self.all_pids().items()}

    def all_pids(self) -> dict[str, list[int]]:
        """The pids of every running process of each service, lowest first."""
        modules = {module.encode(): name for name, module in SERVICES.items()}
        found: dict[str, list[int]] = {}
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                        if b"-m" in argv and argv[argv.index(b"-m") + 1] in modules:
                            found.setdefault(modules[argv[argv.index(b"-m") + 1]], []).append(int(child))
        return {name: sorted(pids) for name, pids in found.items()}

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait up to ``timeout`` s (it drains its services), then SIGKILL; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
        return self.process.returncode if self.process.returncode is not None else -1


async def launch(env: dict[str, str], cwd: Path, timeout: float = 120.0) -> LaunchedStrata:
    """Run ``python -m devstack.launcher`` with ``env`` and wait until it reports everything running.

    Its output keeps being collected in :attr:`LaunchedStrata.output`. A
    launcher that does not get ready in ``timeout`` s is stopped, and the
    error carries what it printed.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.launcher",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    launched = LaunchedStrata(process)
    try:
        await asyncio.wait_for(launched._read(until_ready=True), timeout)
    except BaseException:
        await launched.stop()
        raise RuntimeError("the launcher did not start:\n" + "\n".join(launched.output[-60:])) from None
    launched._reader = asyncio.get_running_loop().create_task(launched._read(until_ready=False))
    return launched


def main() -> None:
    """Entry point of ``python -m devstack.launcher``."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"strata: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("launcher", settings.log_level)
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()

"""End to end: ``make run``'s launcher as a real process, probed with grpcurl and stubs.

Each launcher gets a fresh data folder under ``.strata/e2e-<uuid>`` and free
ports (every service, Postgres, Redis), with DATABASE_URL/REDIS_URL
removed, so it starts its own embedded Postgres and Redis. Strata RPCs go
through the gateway with the dev API key the launcher saves in
``<data>/dev-api-key``; the services themselves refuse unsigned calls. One
launcher serves the read-mostly tests; the shutdown and restart tests start
their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from devstack.launcher import DEV_KEY_FILE
from devstack.ports import free_port
from tests.support.calls import AdminStubs
from tests.support.errors import DETAILS_KEY, error_info
from tests.support.stack import run_to_exit

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
GRPCURL = PROJECT_ROOT / ".venv" / "bin" / "grpcurl"
READY_LINE = "Press Ctrl-C to stop."
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
SERVICE_PORTS = ("gateway", "kv", "admin", "tenants", "vector")  # the STRATA_<NAME>_PORT settings


class Launcher:
    """``python -m devstack.launcher`` in its own session, its output collected by a thread."""

    def __init__(self, data_dir: Path, env_overrides: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        # Every service port Settings knows gets a free one, so no launcher uses a default.
        ports = _distinct_free_ports(len(SERVICE_PORTS) + 2)
        self.ports = dict(zip(SERVICE_PORTS, ports[: len(SERVICE_PORTS)], strict=True))
        self.pg_port, self.redis_port = ports[-2:]
        self.env_overrides = env_overrides or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def gateway_port(self) -> int:
        return self.ports["gateway"]

    @property
    def kv_port(self) -> int:
        return self.ports["kv"]

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    @property
    def gateway_target(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def kv_target(self) -> str:
        return f"127.0.0.1:{self.kv_port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def key_file(self) -> Path:
        return self.data_dir / DEV_KEY_FILE

    @property
    def api_key(self) -> str:
        """The dev API key the launcher saved."""
        return self.key_file.read_text().strip()

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the dev API key."""
        return (("authorization", f"Bearer {self.api_key}"),)

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STRATA_") and k not in {"DATABASE_URL", "REDIS_URL", "DATABASE_READ_URLS"}
        }
        env.update(
            STRATA_DATA_DIR=str(self.data_dir),
            STRATA_EMBEDDED_PG_PORT=str(self.pg_port),
            STRATA_EMBEDDED_REDIS_PORT=str(self.redis_port),
        )
        env.update({f"STRATA_{name.upper()}_PORT": str(port) for name, port in self.ports.items()})
        env.update(self.env_overrides)
        return env

    def start(self) -> None:
        """Start the launcher and wait for its ready line (fails the test with its output)."""
        self._lines.clear()
        self._ready.clear()
        self.process = subprocess.Popen(
            [str(PYTHON), "-m", "devstack.launcher"],
            cwd=PROJECT_ROOT,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.1):
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail(
                    f"launcher exited with code {self.process.returncode} before it was ready:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"launcher not ready within {READY_TIMEOUT_S:g}s; its output:\n{self.output()}")

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self._lines.append(line)
            if line.strip() == READY_LINE:
                self._ready.set()

    def output(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def sigterm(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """The exit code; fails the test (with the output) if it does not exit in time."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"launcher did not exit within {timeout:.0f}s of SIGTERM; its output:\n{self.output()}"
            )
        if self._reader is not None:
            self._reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL the launcher and whatever it started (matched by the data folder)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in processes_mentioning(self.data_dir.name, include_environ=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop it if still running (SIGTERM, then SIGKILL) and remove its data folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def processes_mentioning(marker: str, *, include_environ: bool = False) -> dict[int, str]:
    """pid → cmdline of every other process whose cmdline (or environment) contains ``marker``."""
    found: dict[int, str] = {}
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes() if include_environ else b""
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def new_data_dir() -> Path:
    return PROJECT_ROOT / ".strata" / f"e2e-{uuid.uuid4().hex[:12]}"


def grpcurl(launcher: Launcher, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext -H "authorization: Bearer <dev key>" [-d data] <gateway> args...``."""
    flags = ["-plaintext", "-H", f"authorization: Bearer {launcher.api_key}"]
    flags += ["-d", data] if data is not None else []
    return subprocess.run(
        [str(GRPCURL), *flags, launcher.gateway_target, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def grpcurl_json(launcher: Launcher, method: str, data: str) -> dict[str, object]:
    result = grpcurl(launcher, method, data=data)
    assert result.returncode == 0, f"grpcurl {method} failed: {result.stdout}{result.stderr}"
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    """One launcher for the module's read-mostly tests."""
    started = Launcher(new_data_dir())
    try:
        started.start()
        yield started
    finally:
        started.close()


@pytest.fixture
def own_launcher() -> Iterator[Launcher]:
    """A launcher of the test's own, which the test may stop."""
    started = Launcher(new_data_dir())
    try:
        started.start()
        yield started
    finally:
        started.close()


# -- grpcurl -------------------------------------------------------------------


def test_the_launcher_prints_every_address_and_the_dev_key(launcher):
    output = launcher.output()
    assert set(launcher.ports) == {"kv", "tenants", "vector", "admin", "gateway"}
    for name, port in launcher.ports.items():
        target = re.escape(f"127.0.0.1:{port}")
        assert re.search(rf"^  {name} +{target}$", output, re.MULTILINE), (name, output)
    assert f"Dev API key (operator scope, tenant 'dev'): {launcher.api_key}" in output
    assert str(launcher.key_file) in output


def test_only_admin_is_given_the_key_pepper(launcher):
    assert launcher.process is not None
    children = [
        int(pid)
        for pid in Path(f"/proc/{launcher.process.pid}/task/{launcher.process.pid}/children")
        .read_text()
        .split()
    ]
    given = {}
    for pid in children:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"-m" not in command:
            continue  # the embedded Postgres and Redis
        module = command[command.index(b"-m") + 1].decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        given[module] = any(variable.startswith(b"STRATA_KEY_PEPPER=") for variable in environ)
    assert given == {
        "services.kv": False,
        "services.tenants": False,
        "services.vector": False,
        "services.admin": True,
        "gateway": False,
    }


def test_grpcurl_list_on_the_gateway_shows_every_service_health_and_reflection(launcher):
    result = grpcurl(launcher, "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {
        "strata.kv.v1.KvService",
        "strata.tenants.v1.TenantService",
        "strata.tenants.v1.RecordService",
        "strata.vector.v1.VectorService",
        "strata.admin.v1.ApiKeyService",
        "strata.admin.v1.OperationsService",
        "strata.admin.v1.BackupService",
        "strata.admin.v1.AuditService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_grpcurl_describe_service_shows_every_rpc(launcher):
    result = grpcurl(launcher, "describe", "strata.kv.v1.KvService")
    assert result.returncode == 0, result.stderr
    for rpc in ["Get", "BatchGet", "Put", "BatchPut", "Delete", "List"]:
        assert f"rpc {rpc} ( .strata.kv.v1.{rpc}Request ) returns ( .strata.kv.v1.{rpc}Response )" in (
            result.stdout
        )
    assert "rpc Watch ( .strata.kv.v1.WatchRequest ) returns ( stream .strata.kv.v1.WatchResponse )" in (
        result.stdout
    )


def test_grpcurl_describe_put_request_shows_its_fields(launcher):
    result = grpcurl(launcher, "describe", "strata.kv.v1.PutRequest")
    assert result.returncode == 0, result.stderr
    for field in [
        "string namespace = 1;",
        "string key = 2;",
        "bytes value = 3;",
        "string content_type = 4;",
        ".google.protobuf.Duration ttl = 5;",
        "optional int64 if_revision = 6;",
        "bool return_previous = 7;",
    ]:
        assert field in result.stdout


@pytest.mark.parametrize(
    ("symbol", "phrase"),
    [
        ("strata.kv.v1.KvService", "Increments the store revision by one and generates one PUT event"),
        ("strata.kv.v1.PutRequest", '0 means "only if the key does not exist"'),
    ],
)
def test_grpcurl_describe_shows_proto_comments(launcher, symbol, phrase):
    result = grpcurl(launcher, "describe", symbol)
    assert result.returncode == 0, result.stderr
    assert phrase in result.stdout


def test_grpcurl_put_then_get_returns_the_value_and_matching_revisions(launcher):
    put = grpcurl_json(
        launcher,
        "strata.kv.v1.KvService/Put",
        '{"namespace":"e2e","key":"greeting","value":"aGVsbG8=","content_type":"text/plain"}',
    )
    got = grpcurl_json(launcher, "strata.kv.v1.KvService/Get", '{"namespace":"e2e","key":"greeting"}')
    put_kv, got_kv = put["kv"], got["kv"]
    assert isinstance(put_kv, dict) and isinstance(got_kv, dict)
    assert got_kv["value"] == "aGVsbG8="
    assert got_kv["content_type"] == "text/plain"
    assert "value" not in put_kv  # the acknowledgement leaves the value out
    revision = put["header"]["revision"]  # type: ignore[index]
    assert int(revision) > 0
    assert put_kv["mod_revision"] == got_kv["mod_revision"] == revision
    assert got_kv["create_revision"] == revision
    assert got_kv["version"] == "1"


async def test_grpcurl_branch_at_a_point_in_time_holds_what_was_committed_by_then(launcher):
    put = '{"namespace":"pitr","key":"%s","value":"aGVsbG8="}'
    deadline = time.monotonic() + 60
    while "earliest_time" not in grpcurl_json(
        launcher, "strata.admin.v1.BackupService/GetRecoveryWindow", "{}"
    ):
        assert time.monotonic() < deadline, "no base backup within 60 s of the start"
        await asyncio.sleep(0.2)
    grpcurl_json(launcher, "strata.kv.v1.KvService/Put", put % "a")
    await asyncio.sleep(0.01)
    as_of = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    await asyncio.sleep(0.01)
    grpcurl_json(launcher, "strata.kv.v1.KvService/Put", put % "b")
    grpcurl_json(launcher, "strata.kv.v1.KvService/Delete", '{"namespace":"pitr","key":"a"}')

    made = grpcurl_json(
        launcher, "strata.admin.v1.BackupService/CreateBranch", json.dumps({"name": "then", "as_of": as_of})
    )
    branch = made["branch"]
    assert isinstance(branch, dict)
    assert (branch["origin"], branch["running"]) == ("point_in_time", True)
    port = int(str(branch["address"]).rsplit(":", 1)[1])
    assert branch["connection_string"] == f"postgresql://strata_service@127.0.0.1:{port}/strata"
    password = (launcher.data_dir / "secrets" / "pg-owner-password").read_text().strip()
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, database="strata"
    )
    try:
        keys = await conn.fetch("SELECT key FROM kv.entries WHERE namespace = 'pitr'")
    finally:
        await conn.close()
    assert [r["key"] for r in keys] == ["a"]
    live = grpcurl(launcher, "strata.kv.v1.KvService/Get", data='{"namespace":"pitr","key":"a"}')
    assert "NotFound" in live.stderr, live.stderr

    grpcurl_json(launcher, "strata.admin.v1.BackupService/DeleteBranch", '{"name":"then"}')
    assert port_refuses(port)


def test_grpcurl_put_with_an_empty_key_is_invalid_argument_with_bad_request(launcher):
    result = grpcurl(
        launcher, "strata.kv.v1.KvService/Put", data='{"namespace":"e2e","key":"","value":"eA=="}'
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    details = [json.loads(line.split("\t", 1)[1]) for line in result.stderr.splitlines() if "\t{" in line]
    bad_request = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"]
    assert bad_request == [
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [{"field": "key", "description": "required"}],
        }
    ]
    (info,) = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert (info["reason"], info["domain"]) == ("INVALID_ARGUMENT", "strata.kv.v1")


@pytest.mark.parametrize("service", ["", "strata.kv.v1.KvService", "strata.admin.v1.OperationsService"])
def test_grpcurl_health_check_is_serving(launcher, service):
    reply = grpcurl_json(launcher, "grpc.health.v1.Health/Check", json.dumps({"service": service}))
    assert reply == {"status": "SERVING"}


# -- generated stubs -------------------------------------------------------------


def test_stub_put_then_get_round_trips(launcher):
    with grpc.insecure_channel(launcher.gateway_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        put = stub.Put(
            kv_pb2.PutRequest(namespace="e2e", key="stub/ключ", value=b"\x00\xffbytes", content_type="a/b"),
            metadata=launcher.auth,
            timeout=10,
        )
        got = stub.Get(
            kv_pb2.GetRequest(namespace="e2e", key="stub/ключ"), metadata=launcher.auth, timeout=10
        )
    assert got.kv.value == b"\x00\xffbytes"
    assert got.kv.content_type == "a/b"
    assert got.kv.mod_revision == put.kv.mod_revision == put.header.revision
    assert got.header.revision >= put.header.revision


def test_stub_health_check_is_serving(launcher):
    with grpc.insecure_channel(launcher.gateway_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_call_without_the_key_is_unauthenticated(launcher):
    with grpc.insecure_channel(launcher.gateway_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            kv_pb2_grpc.KvServiceStub(channel).Get(kv_pb2.GetRequest(namespace="e2e", key="k"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "MISSING_API_KEY"


# -- the dev key and the services behind the gateway -------------------------------


def test_the_dev_key_file_is_private_and_holds_one_line(launcher):
    mode = stat.S_IMODE(launcher.key_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    text = launcher.key_file.read_text()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    key = text[:-1]
    assert key and key == key.strip(), repr(text)
    assert key.startswith("sk_"), repr(text)


def test_the_kv_port_refuses_the_dev_key_without_a_gateway_signature(launcher):
    with grpc.insecure_channel(launcher.kv_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        for metadata in (launcher.auth, ()):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Put(
                    kv_pb2.PutRequest(namespace="e2e", key="direct", value=b"x"),
                    metadata=metadata,
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                stub.Get(kv_pb2.GetRequest(namespace="e2e", key="direct"), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_admin_port_refuses_the_dev_key_without_a_gateway_signature(launcher):
    with grpc.insecure_channel(launcher.admin_target) as channel:
        stub = AdminStubs(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=launcher.auth, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_second_start_on_the_same_data_folder_reuses_the_dev_key(own_launcher):
    before = own_launcher.key_file.read_bytes()
    stat_before = own_launcher.key_file.stat()
    with grpc.insecure_channel(own_launcher.gateway_target) as channel:
        put = kv_pb2_grpc.KvServiceStub(channel).Put(
            kv_pb2.PutRequest(namespace="restart", key="k", value=b"kept"),
            metadata=own_launcher.auth,
            timeout=10,
        )
    own_launcher.sigterm()
    assert own_launcher.wait(STOP_TIMEOUT_S) == 0, own_launcher.output()

    own_launcher.start()  # same data folder and ports
    assert own_launcher.key_file.read_bytes() == before
    stat_after = own_launcher.key_file.stat()
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)
    assert stat.S_IMODE(stat_after.st_mode) == 0o600
    # Shown whole once, when made; after that only as much as tells which key it is.
    key = before.decode().strip()
    key_id = key.split("_")[1]
    restarted = own_launcher.output().split("Strata is running:")[-1]
    assert f"Dev API key (operator scope, tenant 'dev'): sk_{key_id}_…" in restarted
    assert key not in restarted
    with grpc.insecure_channel(own_launcher.gateway_target) as channel:
        got = kv_pb2_grpc.KvServiceStub(channel).Get(
            kv_pb2.GetRequest(namespace="restart", key="k"), metadata=own_launcher.auth, timeout=10
        )
    assert (got.kv.value, got.kv.mod_revision) == (b"kept", put.header.revision)


# -- shutdown --------------------------------------------------------------------


def test_sigterm_stops_the_launcher_and_everything_it_started(own_launcher):
    marker = own_launcher.data_dir.name
    running = processes_mentioning(marker, include_environ=True)
    assert any("postgres" in cmd for cmd in processes_mentioning(marker).values()), running
    for module in ("services.kv", "services.admin", "-m gateway"):
        assert any(module in cmd for cmd in running.values()), (module, running)
    own_launcher.sigterm()
    code = own_launcher.wait(STOP_TIMEOUT_S)
    output = own_launcher.output()
    assert code == 0, output
    assert "Strata: stopped" in output
    assert processes_mentioning(marker) == {}
    assert processes_mentioning(marker, include_environ=True) == {}  # the service processes too
    for port in (own_launcher.gateway_port, own_launcher.kv_port, own_launcher.admin_port):
        assert port_refuses(port), port


async def test_sigterm_drains_puts_ends_watch_and_keeps_acknowledged_writes(own_launcher):
    namespace = "drain"
    auth = own_launcher.auth
    acknowledged: dict[str, tuple[bytes, int]] = {}
    failures: list[grpc.aio.AioRpcError] = []
    watch_created: list[bool] = []
    async with grpc.aio.insecure_channel(own_launcher.gateway_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        watch = stub.Watch(
            kv_pb2.WatchRequest(namespace=namespace, prefix="", start_revision=0), metadata=auth
        )

        async def follow() -> grpc.aio.AioRpcError | None:
            try:
                async for message in watch:
                    watch_created.append(message.created)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        watching = asyncio.create_task(follow())
        deadline = time.monotonic() + 30
        while not watch_created:
            assert time.monotonic() < deadline, "the watch never sent its created message"
            await asyncio.sleep(0.01)

        async def put(i: int) -> None:
            key, value = f"k{i:03d}", f"value-{i}".encode()
            try:
                reply = await stub.Put(
                    kv_pb2.PutRequest(namespace=namespace, key=key, value=value), metadata=auth, timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
            else:
                acknowledged[key] = (value, reply.header.revision)

        puts = [asyncio.create_task(put(i)) for i in range(200)]
        while not acknowledged and not failures:
            assert time.monotonic() < deadline, "no Put finished"
            await asyncio.sleep(0.001)
        finished_before_sigterm = len(acknowledged) + len(failures)
        own_launcher.sigterm()
        await asyncio.wait_for(asyncio.gather(*puts), 60)
        watch_error = await asyncio.wait_for(watching, 60)

    assert own_launcher.wait(STOP_TIMEOUT_S) == 0, own_launcher.output()
    assert finished_before_sigterm < 200  # SIGTERM came while Puts were in flight
    assert acknowledged, f"no Put succeeded; failures: {[f.code() for f in failures]}"
    assert len(acknowledged) + len(failures) == 200
    for failure in failures:
        assert_shutdown_error(failure)
    assert watch_created[0] is True
    assert watch_error is not None, "the watch ended without an error"
    assert_shutdown_error(watch_error)

    own_launcher.start()  # same data folder and ports (and dev key)
    with grpc.insecure_channel(own_launcher.gateway_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        for key, (value, revision) in sorted(acknowledged.items()):
            got = stub.Get(kv_pb2.GetRequest(namespace=namespace, key=key), metadata=auth, timeout=10)
            assert (key, got.kv.value, got.kv.mod_revision) == (key, value, revision)


def assert_shutdown_error(error: grpc.aio.AioRpcError) -> None:
    """A call cut short by the shutdown: CANCELLED, or UNAVAILABLE (reason SHUTTING_DOWN when it says one)."""
    assert error.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, error
    if error.code() == grpc.StatusCode.UNAVAILABLE and has_details(error):
        info = error_info(error)
        assert info.reason == "SHUTTING_DOWN", error
        if "resume_revision" in info.metadata:  # a watch ended by the KV service
            assert info.domain == "strata.kv.v1"
            assert int(info.metadata["resume_revision"]) > 0


def has_details(error: grpc.aio.AioRpcError) -> bool:
    return any(key == DETAILS_KEY for key, _ in error.trailing_metadata() or ())


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize("variable", ["STRATA_KV_PORT", "STRATA_GATEWAY_PORT"])
def test_a_bad_port_setting_exits_with_code_2_naming_the_variable(variable):
    data_dir = new_data_dir()
    env = Launcher(data_dir, {variable: "abc"}).environment()
    try:
        result = run_to_exit("devstack.launcher", env)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert variable in result.stderr
    assert "abc" in result.stderr
    assert "Strata: starting" not in result.stdout

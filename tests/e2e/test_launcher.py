"""End to end: ``make run``'s launcher as a real process, probed with grpcurl and stubs.

Each launcher gets a fresh data folder under ``.strata/e2e-<uuid>`` and free
ports, with DATABASE_URL/REDIS_URL removed, so it starts its own embedded
Postgres and Redis. One launcher serves the read-mostly tests; the shutdown
tests start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from tests.conftest import free_port
from tests.helpers import error_info

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYTHON = PROJECT_ROOT / ".venv" / "bin" / "python"
GRPCURL = PROJECT_ROOT / ".venv" / "bin" / "grpcurl"
READY_LINE = "Press Ctrl-C to stop."
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


class Launcher:
    """``python -m shared.launcher`` in its own session, its output collected by a thread."""

    def __init__(self, data_dir: Path, env_overrides: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.kv_port, self.pg_port, self.redis_port = _distinct_free_ports(3)
        self.env_overrides = env_overrides or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def kv_target(self) -> str:
        return f"127.0.0.1:{self.kv_port}"

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
            STRATA_KV_PORT=str(self.kv_port),
        )
        env.update(self.env_overrides)
        return env

    def start(self) -> None:
        """Start the launcher and wait for its ready line (fails the test with its output)."""
        self._lines.clear()
        self._ready.clear()
        self.process = subprocess.Popen(
            [str(PYTHON), "-m", "shared.launcher"],
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


def grpcurl(target: str, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext [-d data] target args...``."""
    flags = ["-plaintext", *(["-d", data] if data is not None else [])]
    return subprocess.run(
        [str(GRPCURL), *flags, target, *args], capture_output=True, text=True, timeout=30, check=False
    )


def grpcurl_json(target: str, method: str, data: str) -> dict[str, object]:
    result = grpcurl(target, method, data=data)
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


def test_grpcurl_list_shows_kv_and_health(launcher):
    result = grpcurl(launcher.kv_target, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "strata.kv.v1.KvService" in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_describe_service_shows_every_rpc(launcher):
    result = grpcurl(launcher.kv_target, "describe", "strata.kv.v1.KvService")
    assert result.returncode == 0, result.stderr
    for rpc in ["Get", "BatchGet", "Put", "BatchPut", "Delete", "List"]:
        assert f"rpc {rpc} ( .strata.kv.v1.{rpc}Request ) returns ( .strata.kv.v1.{rpc}Response )" in (
            result.stdout
        )
    assert "rpc Watch ( .strata.kv.v1.WatchRequest ) returns ( stream .strata.kv.v1.WatchResponse )" in (
        result.stdout
    )


def test_grpcurl_describe_put_request_shows_its_fields(launcher):
    result = grpcurl(launcher.kv_target, "describe", "strata.kv.v1.PutRequest")
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
    result = grpcurl(launcher.kv_target, "describe", symbol)
    assert result.returncode == 0, result.stderr
    assert phrase in result.stdout


def test_grpcurl_put_then_get_returns_the_value_and_matching_revisions(launcher):
    put = grpcurl_json(
        launcher.kv_target,
        "strata.kv.v1.KvService/Put",
        '{"namespace":"e2e","key":"greeting","value":"aGVsbG8=","content_type":"text/plain"}',
    )
    got = grpcurl_json(
        launcher.kv_target, "strata.kv.v1.KvService/Get", '{"namespace":"e2e","key":"greeting"}'
    )
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


def test_grpcurl_put_with_an_empty_key_is_invalid_argument_with_bad_request(launcher):
    result = grpcurl(
        launcher.kv_target, "strata.kv.v1.KvService/Put", data='{"namespace":"e2e","key":"","value":"eA=="}'
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


@pytest.mark.parametrize("service", ["", "strata.kv.v1.KvService"])
def test_grpcurl_health_check_is_serving(launcher, service):
    reply = grpcurl_json(launcher.kv_target, "grpc.health.v1.Health/Check", json.dumps({"service": service}))
    assert reply == {"status": "SERVING"}


# -- generated stubs -------------------------------------------------------------


def test_stub_put_then_get_round_trips(launcher):
    with grpc.insecure_channel(launcher.kv_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        put = stub.Put(
            kv_pb2.PutRequest(namespace="e2e", key="stub/ключ", value=b"\x00\xffbytes", content_type="a/b"),
            timeout=10,
        )
        got = stub.Get(kv_pb2.GetRequest(namespace="e2e", key="stub/ключ"), timeout=10)
    assert got.kv.value == b"\x00\xffbytes"
    assert got.kv.content_type == "a/b"
    assert got.kv.mod_revision == put.kv.mod_revision == put.header.revision
    assert got.header.revision >= put.header.revision


def test_stub_health_check_is_serving(launcher):
    with grpc.insecure_channel(launcher.kv_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- shutdown --------------------------------------------------------------------


def test_sigterm_stops_the_launcher_and_everything_it_started(own_launcher):
    marker = own_launcher.data_dir.name
    running = processes_mentioning(marker, include_environ=True)
    assert any("postgres" in cmd for cmd in processes_mentioning(marker).values()), running
    assert any("services.kv" in cmd for cmd in running.values()), running
    own_launcher.sigterm()
    code = own_launcher.wait(STOP_TIMEOUT_S)
    output = own_launcher.output()
    assert code == 0, output
    assert "Strata: stopped" in output
    assert processes_mentioning(marker) == {}
    assert processes_mentioning(marker, include_environ=True) == {}  # the KV process too
    assert port_refuses(own_launcher.kv_port)


async def test_sigterm_drains_puts_ends_watch_and_keeps_acknowledged_writes(own_launcher):
    namespace = "drain"
    acknowledged: dict[str, tuple[bytes, int]] = {}
    failures: list[grpc.StatusCode] = []
    watch_created: list[bool] = []
    async with grpc.aio.insecure_channel(own_launcher.kv_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        watch = stub.Watch(kv_pb2.WatchRequest(namespace=namespace, prefix="", start_revision=0))

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
                    kv_pb2.PutRequest(namespace=namespace, key=key, value=value), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code())
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
    assert acknowledged, f"no Put succeeded; failures: {failures}"
    assert len(acknowledged) + len(failures) == 200
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failures
    assert watch_created[0] is True
    assert watch_error is not None, "the watch ended without an error"
    assert watch_error.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, watch_error
    if watch_error.code() == grpc.StatusCode.UNAVAILABLE:
        info = error_info(watch_error)
        assert (info.reason, info.domain) == ("SHUTTING_DOWN", "strata.kv.v1")
        assert int(info.metadata["resume_revision"]) > 0

    own_launcher.start()  # same data folder and ports
    with grpc.insecure_channel(own_launcher.kv_target) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        for key, (value, revision) in sorted(acknowledged.items()):
            got = stub.Get(kv_pb2.GetRequest(namespace=namespace, key=key), timeout=10)
            assert (key, got.kv.value, got.kv.mod_revision) == (key, value, revision)


# -- configuration -----------------------------------------------------------------


def test_a_bad_port_setting_exits_with_code_2_naming_the_variable():
    data_dir = new_data_dir()
    env = Launcher(data_dir, {"STRATA_KV_PORT": "abc"}).environment()
    try:
        result = subprocess.run(
            [str(PYTHON), "-m", "shared.launcher"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            start_new_session=True,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "STRATA_KV_PORT" in result.stderr
    assert "abc" in result.stderr
    assert "Strata: starting" not in result.stdout

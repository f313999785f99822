"""Traces from a real service process to a real OTLP receiver; sampling; JSON logs with trace ids."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import pytest
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from devstack.ports import free_port
from shared.config.settings import Settings
from tests.conftest import PROJECT_ROOT, TENANT, signed_channel
from tests.support.otlp import TraceReceiver, start_receiver

SERVER, CLIENT = 2, 3  # OTLP span kinds


@dataclass
class TracedKv:
    """A KV process exporting every span to its own receiver, its stderr (JSON logs) collected."""

    port: int
    receiver: TraceReceiver
    process: asyncio.subprocess.Process
    logs: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def stop(self) -> int:
        """SIGTERM; the exit code, once its spans are flushed and every log line is read."""
        if self.process.returncode is None:
            self.process.terminate()
        try:
            code = await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 10)
        return code

    def json_logs(self) -> list[dict]:
        return [json.loads(line) for line in self.logs if line.startswith("{")]


@asynccontextmanager
async def traced_kv_process(settings: Settings, **extra: str) -> AsyncIterator[TracedKv]:
    """Run ``python -m services.kv`` against the test backends, tracing to a fresh receiver."""
    server, receiver = await start_receiver()
    port = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        STRATA_KV_PORT=str(port),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="strata-kv-test",
        STRATA_INTERNAL_SECRET=settings.internal_secret,
        **extra,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.kv",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    kv = TracedKv(port, receiver, process)

    async def drain_stderr() -> None:
        # Read logs as they come: a full pipe would block the process mid-write.
        assert process.stderr is not None
        async for raw in process.stderr:
            kv.logs.append(raw.decode(errors="replace"))

    kv.reader = asyncio.create_task(drain_stderr())
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"READY kv"), line
        yield kv
    finally:
        await kv.stop()
        await server.stop(None)


@pytest.fixture
async def traced_kv(settings) -> AsyncIterator[TracedKv]:
    """A KV process exporting spans (100 % sampling) to an in-test receiver."""
    async with traced_kv_process(settings) as kv:
        yield kv


async def test_a_call_yields_server_database_and_redis_spans_in_one_trace(traced_kv, namespace):
    receiver = traced_kv.receiver
    async with signed_channel(traced_kv.port, TENANT) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"))

    def complete(spans):
        put = [s for s in spans if s.kind == SERVER and s.name == "strata.kv.v1.KvService/Put"]
        if not put:
            return False
        trace = [s for s in spans if s.trace_id == put[0].trace_id]
        return any(s.attributes.get("db.system") == "postgresql" for s in trace) and any(
            s.attributes.get("db.system") == "redis" for s in trace
        )

    spans = await receiver.wait_for(complete)
    server_span = next(s for s in spans if s.kind == SERVER and s.name == "strata.kv.v1.KvService/Put")
    assert server_span.service == "strata-kv-test"
    assert server_span.attributes["rpc.system"] == "grpc"
    assert server_span.attributes["rpc.service"] == "strata.kv.v1.KvService"
    assert server_span.attributes["rpc.method"] == "Put"
    assert server_span.attributes["rpc.grpc.status_code"] == 0
    trace = [s for s in spans if s.trace_id == server_span.trace_id]
    db_span = next(s for s in trace if s.attributes.get("db.system") == "postgresql")
    assert db_span.kind == CLIENT
    assert "kv.put_batch" in str(db_span.attributes.get("db.statement", ""))
    # The database conventions' operation, and which of Strata's functions the SELECT calls.
    assert db_span.attributes.get("db.operation") == "SELECT"
    assert db_span.attributes.get("db.stored_procedure.name") == "kv.put_batch"
    assert db_span.parent_span_id == server_span.span_id


async def test_a_failing_call_records_its_code_and_server_errors_only_for_server_faults(traced_kv, namespace):
    receiver = traced_kv.receiver
    async with signed_channel(traced_kv.port, TENANT) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"))
    spans = await receiver.wait_for(lambda ss: any(s.name == "strata.kv.v1.KvService/Get" for s in ss))
    get = next(s for s in spans if s.name == "strata.kv.v1.KvService/Get")
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # The RPC conventions: NOT_FOUND is the caller's problem, so the server span stays unset.
    assert get.status_code == 0


async def test_logs_are_json_lines(traced_kv):
    assert await traced_kv.stop() == 0
    lines = traced_kv.json_logs()
    assert lines, "no JSON log lines"
    assert all({"ts", "level", "service", "msg"} <= set(line) for line in lines)
    assert any(line["msg"] == "stopped" for line in lines)


async def test_a_line_logged_inside_a_call_carries_the_exported_trace_and_span_ids(settings, namespace):
    # Every statement is "slow": the slow-query warning is logged inside the call's Postgres span.
    async with traced_kv_process(settings, STRATA_SLOW_QUERY_MS="0") as traced:
        async with signed_channel(traced.port, TENANT) as channel:
            await kv_pb2_grpc.KvServiceStub(channel).Put(
                kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v")
            )
        assert await traced.stop() == 0  # flushes the spans and the logs
        spans, lines = traced.receiver.spans, traced.json_logs()
    put = next(s for s in spans if s.kind == SERVER and s.name == "strata.kv.v1.KvService/Put")
    exported = {s.span_id: s for s in spans if s.trace_id == put.trace_id}
    inside = [line for line in lines if line.get("trace_id") == put.trace_id]
    assert inside, "no log line carries the call's trace id"
    slow = next(line for line in inside if "kv.put_batch" in line.get("statement", ""))
    assert slow["msg"] == "slow query" and slow["level"] == "WARNING"
    # The line's span is the exported Postgres span of that statement, inside the call's span.
    assert slow["span_id"] in exported, (slow, list(exported))
    database = exported[slow["span_id"]]
    assert database.attributes.get("db.system") == "postgresql"
    assert "kv.put_batch" in str(database.attributes.get("db.statement"))
    assert database.parent_span_id == put.span_id
    assert all(len(line["trace_id"]) == 32 and len(line["span_id"]) == 16 for line in inside)


async def test_server_span_continues_the_callers_w3c_trace(traced_kv, namespace):
    receiver = traced_kv.receiver
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with signed_channel(traced_kv.port, TENANT) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        await kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"),
            metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
        )
    spans = await receiver.wait_for(lambda ss: any(s.trace_id == trace_id for s in ss))
    server_span = next(s for s in spans if s.trace_id == trace_id and s.kind == SERVER)
    assert server_span.parent_span_id == parent_id


# -- sampling by the standard variables, through shared.observability.telemetry.setup_telemetry ----

# One process start as run_service does it (settings, then telemetry), one SERVER
# span continuing the traceparent in argv[1] if any, then the exit-time flush.
PROBE = """
import sys
from shared.config.settings import load_settings
from shared.observability.telemetry import setup_telemetry, shutdown_telemetry
from shared.rpc.spans import end_rpc_span, rpc_server_span

settings = load_settings()
assert setup_telemetry("strata-sampling-probe", settings.otlp_protocol)
metadata = [("traceparent", sys.argv[1])] if len(sys.argv) > 1 else []
with rpc_server_span("strata.probe.v1.Probe", "Call", metadata) as span:
    end_rpc_span(span, None)
shutdown_telemetry()
"""


async def probe_spans(sampler: dict[str, str], traceparent: str | None) -> list:
    """The spans one probe process exported under ``sampler``'s OTEL_* settings."""
    server, receiver = await start_receiver()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}", **sampler)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PROBE,
            *([traceparent] if traceparent else []),
            env=env,
            cwd=PROJECT_ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        # shutdown_telemetry returned only after the exporter's last call was answered.
        return list(receiver.spans)
    finally:
        await server.stop(None)


def traceparent(sampled: bool) -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a caller's context, sampled or not."""
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", trace_id, parent


RATIO_0 = {"OTEL_TRACES_SAMPLER_ARG": "0"}


@pytest.mark.parametrize(
    ("sampler", "parent"),
    [
        ({"OTEL_TRACES_SAMPLER": "always_off"}, None),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, True),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", **RATIO_0}, None),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", **RATIO_0}, True),  # not parent-based: drops it too
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", **RATIO_0}, None),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, None),
        ({}, False),  # the default, parentbased_always_on: an unsampled caller stays unsampled
    ],
)
async def test_a_sampler_that_drops_the_span_stops_its_export(sampler, parent):
    header = traceparent(parent)[0] if parent is not None else None
    assert await probe_spans(sampler, header) == []


@pytest.mark.parametrize(
    "sampler",
    [
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", **RATIO_0},
        {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
        {},
    ],
)
async def test_a_parent_based_sampler_honours_a_sampled_caller(sampler):
    header, trace_id, parent = traceparent(sampled=True)
    (span,) = await probe_spans(sampler, header)
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent)
    assert span.service == "strata-sampling-probe"
    assert span.name == "strata.probe.v1.Probe/Call"


async def test_without_a_sampler_setting_a_root_span_is_exported():
    (span,) = await probe_spans({}, None)
    assert span.parent_span_id == ""

"""Traces from a real service process to a real OTLP receiver; JSON logs with trace ids."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc
import pytest
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from shared.ports import free_port
from tests.conftest import TENANT, signed_channel
from tests.otlp import start_receiver

SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
async def traced_kv(settings):
    """A KV process exporting spans (100 % sampling) to an in-test receiver."""
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
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.kv",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    logs: list[str] = []

    async def drain_stderr() -> None:
        # Read logs as they come: a full pipe would block the process mid-write.
        assert process.stderr is not None
        async for raw in process.stderr:
            logs.append(raw.decode(errors="replace"))

    reader = asyncio.create_task(drain_stderr())
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"READY kv"), line
        yield port, receiver, process, logs
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        await asyncio.wait_for(reader, 10)
        await server.stop(None)


async def test_a_call_yields_server_database_and_redis_spans_in_one_trace(traced_kv, namespace):
    port, receiver, _, _ = traced_kv
    async with signed_channel(port, TENANT) as channel:
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
    assert db_span.parent_span_id == server_span.span_id


async def test_a_failing_call_records_its_code_and_server_errors_only_for_server_faults(traced_kv, namespace):
    port, receiver, _, _ = traced_kv
    async with signed_channel(port, TENANT) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="absent"))
    spans = await receiver.wait_for(lambda ss: any(s.name == "strata.kv.v1.KvService/Get" for s in ss))
    get = next(s for s in spans if s.name == "strata.kv.v1.KvService/Get")
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # The RPC conventions: NOT_FOUND is the caller's problem, so the server span stays unset.
    assert get.status_code == 0


async def test_logs_are_json_lines_with_trace_ids(traced_kv):
    _, _, process, logs = traced_kv
    process.terminate()
    assert await asyncio.wait_for(process.wait(), 30) == 0
    await asyncio.sleep(0.2)  # the last lines reach the reader
    lines = [json.loads(line) for line in logs if line.startswith("{")]
    assert lines, "no JSON log lines"
    assert all({"ts", "level", "service", "msg"} <= set(line) for line in lines)
    assert any(line["msg"] == "stopped" for line in lines)


async def test_server_span_continues_the_callers_w3c_trace(traced_kv, namespace):
    port, receiver, _, _ = traced_kv
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with signed_channel(port, TENANT) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        await kv.Put(
            kv_pb2.PutRequest(namespace=namespace, key="k", value=b"v"),
            metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
        )
    spans = await receiver.wait_for(lambda ss: any(s.trace_id == trace_id for s in ss))
    server_span = next(s for s in spans if s.trace_id == trace_id and s.kind == SERVER)
    assert server_span.parent_span_id == parent_id

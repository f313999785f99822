"""One grpcurl call through the gateway is one trace across every hop, seen by a real OTLP receiver."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.stack import grpcurl, remove_data, start_stack

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3
ERROR = 2


def chain_for(spans, trace_id):
    return [s for s in spans if s.trace_id == trace_id]


async def test_one_call_is_one_trace_from_gateway_to_postgres_and_redis(stack, receiver):
    namespace = f"trace-{uuid.uuid4().hex[:8]}"
    code, out = await grpcurl(
        stack, "strata.kv.v1.KvService/Put", {"namespace": namespace, "key": "k", "value": "dg=="}
    )
    assert code == 0, out

    def gateway_server(s):
        return s.service == "strata-gateway" and s.kind == SERVER and s.name == "strata.kv.v1.KvService/Put"

    def parts(chain) -> set[tuple[str, object]]:
        # (process, span kind or db.system) of every span in one trace
        return {(x.service, x.attributes.get("db.system") or x.kind) for x in chain}

    # Each process exports on its own schedule: wait for every part of the trace.
    needed = {
        ("strata-gateway", CLIENT),
        ("strata-gateway", "redis"),
        ("strata-kv", SERVER),
        ("strata-kv", "postgresql"),
        ("strata-kv", "redis"),
    }

    def complete(spans):
        return any(gateway_server(r) and needed <= parts(chain_for(spans, r.trace_id)) for r in spans)

    spans = await receiver.wait_for(complete, timeout=20)
    root = next(r for r in spans if gateway_server(r) and needed <= parts(chain_for(spans, r.trace_id)))
    trace = chain_for(spans, root.trace_id)
    # The forwarded call (the gateway may make other calls, e.g. to resolve the key).
    client = next(
        s
        for s in trace
        if s.service == "strata-gateway" and s.kind == CLIENT and s.name == "strata.kv.v1.KvService/Put"
    )
    service = next(s for s in trace if s.service == "strata-kv" and s.kind == SERVER)
    database = next(
        s
        for s in trace
        if s.service == "strata-kv"
        and s.attributes.get("db.system") == "postgresql"
        and "kv.put_batch" in str(s.attributes.get("db.statement"))
    )
    cache = [s for s in trace if s.attributes.get("db.system") == "redis" and s.service == "strata-kv"]
    limiter = next(
        s for s in trace if s.attributes.get("db.system") == "redis" and s.service == "strata-gateway"
    )
    assert limiter.parent_span_id == root.span_id  # the rate-limit check, inside the gateway's server span
    assert root.parent_span_id == ""  # grpcurl sends no trace context: the gateway starts the trace
    assert client.parent_span_id == root.span_id
    assert service.parent_span_id == client.span_id
    assert database.parent_span_id == service.span_id
    # The cache's write-through: a pipeline inside the service span.
    assert cache and all(s.parent_span_id == service.span_id for s in cache), cache
    for span in (root, client, service):
        assert span.name == "strata.kv.v1.KvService/Put"
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "strata.kv.v1.KvService"
        assert span.attributes["rpc.method"] == "Put"
        assert span.attributes["rpc.grpc.status_code"] == 0
    assert database.attributes.get("db.operation") == "SELECT"
    assert database.attributes.get("db.stored_procedure.name") == "kv.put_batch"


async def test_a_failing_call_marks_the_client_span_as_error(stack, receiver):
    namespace = f"trace-{uuid.uuid4().hex[:8]}"
    code, out = await grpcurl(stack, "strata.kv.v1.KvService/Get", {"namespace": namespace, "key": "absent"})
    assert code != 0 and "NotFound" in out

    def found(spans):
        return any(
            s.kind == CLIENT
            and s.name == "strata.kv.v1.KvService/Get"
            and s.attributes.get("rpc.grpc.status_code") == 5
            for s in spans
        )

    spans = await receiver.wait_for(found, timeout=20)
    client = next(
        s
        for s in spans
        if s.kind == CLIENT
        and s.name == "strata.kv.v1.KvService/Get"
        and s.attributes.get("rpc.grpc.status_code") == 5
    )
    assert client.status_code == ERROR
    service = next(
        s for s in chain_for(spans, client.trace_id) if s.service == "strata-kv" and s.kind == SERVER
    )
    assert service.attributes["rpc.grpc.status_code"] == 5


async def test_the_callers_trace_context_is_continued(stack, receiver):
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    namespace = f"trace-{uuid.uuid4().hex[:8]}"
    code, out = await grpcurl(
        stack,
        "strata.kv.v1.KvService/Put",
        {"namespace": namespace, "key": "k", "value": "dg=="},
        "-H",
        f"traceparent: 00-{trace_id}-{parent}-01",
    )
    assert code == 0, out

    def gateway_server(s) -> bool:
        return s.trace_id == trace_id and s.service == "strata-gateway" and s.kind == SERVER

    # Each process exports on its own schedule: wait for both ends of the trace.
    spans = await receiver.wait_for(
        lambda ss: (
            any(s.trace_id == trace_id and s.service == "strata-kv" for s in ss)
            and any(gateway_server(s) for s in ss)
        )
    )
    root = next(s for s in spans if gateway_server(s))
    assert root.parent_span_id == parent


async def test_logs_carry_the_trace_and_span_ids_of_the_exported_spans(settings, receiver):
    # A stack of its own where every statement is "slow": the kv process logs the
    # slow-query warning inside the call's Postgres span.
    slow = await start_stack(settings, receiver.port, STRATA_SLOW_QUERY_MS="0")
    trace_id = uuid.uuid4().hex
    try:
        code, out = await grpcurl(
            slow,
            "strata.kv.v1.KvService/Put",
            {"namespace": f"trace-{uuid.uuid4().hex[:8]}", "key": "k", "value": "dg=="},
            "-H",
            f"traceparent: 00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
        )
        assert code == 0, out
    finally:
        assert await slow.stop() == 0  # every process flushed its spans and its logs
        remove_data(slow)
    lines = [json.loads(line) for line in slow.output if line.startswith("{")]
    traced = [line for line in lines if line.get("trace_id") == trace_id]
    assert traced, "no log line carries the call's trace id"
    assert all(len(line["span_id"]) == 16 for line in traced)
    exported = {s.span_id: s for s in receiver.spans if s.trace_id == trace_id}
    line = next(line for line in traced if "kv.put_batch" in line.get("statement", ""))
    assert (line["msg"], line["service"]) == ("slow query", "kv")
    span = exported.get(line["span_id"])
    assert span is not None, f"the line's span {line['span_id']} was not exported: {list(exported)}"
    assert span.service == "strata-kv" and span.attributes.get("db.system") == "postgresql"
    service = next(s for s in exported.values() if s.service == "strata-kv" and s.kind == SERVER)
    assert span.parent_span_id == service.span_id

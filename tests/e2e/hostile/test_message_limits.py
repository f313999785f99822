"""Messages over the receive limit (RESOURCE_EXHAUSTED, nothing written), and an answer over the
send limit (a clear error)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import message
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2
from strata.vector.v1 import vector_pb2

from tests.e2e.hostile.database import changed_rows, kv_revision
from tests.e2e.hostile.names import NAME
from tests.e2e.hostile.rpcs import BY_ID, Rpc
from tests.e2e.hostile.stage import MAX_MESSAGE_BYTES, OK, Hostile, report

pytestmark = pytest.mark.e2e


def _oversized() -> list[tuple[Rpc, bytes]]:
    """Requests that are valid but for their size, one per upstream and stream kind."""
    big = "x" * (MAX_MESSAGE_BYTES + 1)
    record = tenants_pb2.Record(collection=NAME, id="oversized")
    record.data.update({"big": big})
    point = vector_pb2.Point(id="oversized", vector=vector_pb2.Vector(values=[1.0, 0.5]), text=big)
    restore = admin_pb2.RestoreRequest(database=NAME, data=b"PGDMP" + big.encode())
    requests: list[tuple[str, message.Message]] = [
        ("KvService.Put", kv_pb2.PutRequest(namespace=NAME, key="oversized", value=big.encode())),
        ("KvService.Watch", kv_pb2.WatchRequest(namespace=NAME, key=big)),
        ("RecordService.CreateRecord", tenants_pb2.CreateRecordRequest(record=record)),
        ("VectorService.UpsertPoints", vector_pb2.UpsertPointsRequest(collection=NAME, points=[point])),
        ("BackupService.Restore", restore),
    ]
    return [(BY_ID[rpc_id], request.SerializeToString()) for rpc_id, request in requests]


async def test_messages_over_the_receive_limit_are_resource_exhausted_and_write_nothing(
    hostile: Hostile,
) -> None:
    since = await kv_revision(hostile.settings)
    before = await hostile.snapshot(exclude=(), since=since)
    jobs = [(rpc, body, via) for rpc, body in _oversized() for via in ("gateway", "direct")]
    outcomes = await asyncio.gather(*(hostile.call(rpc, body, via) for rpc, body, via in jobs))
    failures = [
        f"{rpc.id} via {via}: {outcome.code.name} {outcome.details[:120]}"
        for (rpc, _, via), outcome in zip(jobs, outcomes, strict=True)
        if outcome.code != grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    report(failures, "oversized messages not refused with RESOURCE_EXHAUSTED")
    assert changed_rows(before, await hostile.snapshot(exclude=(), since=since)) == {}
    await hostile.assert_healthy()


async def test_an_answer_over_the_send_limit_is_a_clear_error(hostile: Hostile) -> None:
    # Nine 1 MiB values are fine to store; one BatchGet of all of them is over 8 MiB.
    namespace = f"{NAME}-big"
    put = BY_ID["KvService.BatchPut"]
    items = [kv_pb2.BatchPutItem(key=f"v{i}", value=bytes([i]) * (1024 * 1024)) for i in range(9)]
    for half in (items[:4], items[4:]):
        outcome = await hostile.call(
            put, kv_pb2.BatchPutRequest(namespace=namespace, items=half).SerializeToString(), "direct"
        )
        assert outcome.code == OK, outcome
    get = BY_ID["KvService.BatchGet"]
    body = kv_pb2.BatchGetRequest(namespace=namespace, keys=[item.key for item in items]).SerializeToString()
    for label, outcome in await hostile.both(get, [body]):
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{label}: {outcome}"
    await hostile.assert_healthy()

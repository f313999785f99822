"""The ``hostile`` fixture: the stage every module of this package shares (attacker, victim, baseline),
and in its teardown the check that nothing crashed and no row outside the attacker's tenants changed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import message
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2
from strata.vector.v1 import vector_pb2

from shared.api.callers import OPERATOR_SCOPE
from shared.config.settings import Settings
from tests.e2e.hostile.database import changed_rows, kv_revision
from tests.e2e.hostile.names import ATTACKER_MARK, DIMENSION, NAME, THROWAWAY, VICTIM, VICTIM_MARK
from tests.e2e.hostile.rpcs import BY_ID, HOSTILE_STRINGS, RPCS
from tests.e2e.hostile.stage import CHANNEL_OPTIONS, OK, Hostile, invoke, make_tenant
from tests.support.calls import bearer
from tests.support.stack import Stack


async def _seed(hostile: Hostile, key: str, mark: str, second_collection: str) -> None:
    """The same names for attacker and victim: KV keys, records, two collections, points."""
    md = bearer(key)
    writes: list[tuple[str, message.Message]] = [
        (
            "KvService.BatchPut",
            kv_pb2.BatchPutRequest(
                namespace=NAME,
                items=[kv_pb2.BatchPutItem(key=k, value=mark.encode()) for k in (NAME, "k1", "k2")],
            ),
        ),
    ]
    for record_id in (NAME, "r1", "r2"):
        record = tenants_pb2.Record(collection=NAME, id=record_id)
        record.data.update({"p": "x", "owner": mark})
        writes.append(("RecordService.CreateRecord", tenants_pb2.CreateRecordRequest(record=record)))
    for collection in (NAME, second_collection):
        spec = vector_pb2.Collection(name=collection, dimension=DIMENSION, metric=vector_pb2.METRIC_COSINE)
        writes.append(("VectorService.CreateCollection", vector_pb2.CreateCollectionRequest(collection=spec)))
    points = []
    for i, point_id in enumerate((NAME, "p1", "p2")):
        point = vector_pb2.Point(
            id=point_id, vector=vector_pb2.Vector(values=[1.0, float(i)]), text="hello world"
        )
        point.payload.update({"p": "x", "owner": mark})
        points.append(point)
    writes.append(
        ("VectorService.UpsertPoints", vector_pb2.UpsertPointsRequest(collection=NAME, points=points))
    )
    for rpc_id, request in writes:
        outcome = await invoke(hostile.gateway, BY_ID[rpc_id], request.SerializeToString(), md, 15)
        assert outcome.code == OK, f"seeding {rpc_id}: {outcome}"


async def _cleanup(gateway: grpc.aio.Channel, dev_key: str, settings: Settings) -> None:
    """Remove the stage's tenants (cascade), any branch named like the attacker, declared indexes."""
    for slug in (*THROWAWAY, VICTIM):
        request = tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True)
        await invoke(
            gateway, BY_ID["TenantService.DeleteTenant"], request.SerializeToString(), bearer(dev_key), 60
        )
    branch = admin_pb2.DeleteBranchRequest(name=NAME)
    await invoke(
        gateway, BY_ID["BackupService.DeleteBranch"], branch.SerializeToString(), bearer(dev_key), 60
    )
    # No RPC drops a declared index; the attacker's (on its own collection names) go here.
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        collections = [NAME, *(s for s in HOSTILE_STRINGS if "\x00" not in s)]
        for row in await conn.fetch(
            "SELECT name FROM tenants.record_indexes WHERE collection = ANY($1::text[])", collections
        ):
            await conn.execute(f'DROP INDEX IF EXISTS tenants."{row["name"]}"')
        await conn.execute(
            "DELETE FROM tenants.record_indexes WHERE collection = ANY($1::text[])", collections
        )
    finally:
        await conn.close()


@pytest.fixture(scope="package")
async def hostile(stack: Stack, settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Hostile]:
    """The attacker (keys, channels), the victim's data, and the state everything is compared with.

    Shared by every module of the package. Its teardown prints one line (calls made,
    statuses seen, processes crashed, rows changed), then fails the run (an error at
    teardown) if a process died or a row outside the attacker's tenants changed; the
    stage's tenants are removed and its channels closed either way.
    """
    gateway = grpc.aio.insecure_channel(stack.gateway, options=CHANNEL_OPTIONS)
    direct = {
        upstream: grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[upstream]}", options=CHANNEL_OPTIONS)
        for upstream in sorted({rpc.upstream for rpc in RPCS})
    }
    keys = {upstream: await make_tenant(gateway, stack.api_key, NAME, OPERATOR_SCOPE) for upstream in direct}
    victim_key = await make_tenant(
        gateway,
        stack.api_key,
        VICTIM,
        "kv:read",
        "kv:write",
        "tenants:read",
        "tenants:write",
        "vector:read",
        "vector:write",
    )
    stage = Hostile(stack, settings, gateway, direct, keys, victim_key)
    await _seed(stage, keys["kv"], ATTACKER_MARK, ATTACKER_MARK)
    await _seed(stage, victim_key, VICTIM_MARK, VICTIM_MARK)
    # Declared before the barrage, whose DeclareIndex calls all name it at once (see test_field_values.py's race).
    index = tenants_pb2.DeclareIndexRequest(index=tenants_pb2.RecordIndex(collection=NAME, path="p"))
    outcome = await stage.call(BY_ID["TenantService.DeclareIndex"], index.SerializeToString(), "gateway")
    assert outcome.code == OK, outcome
    stage.since = await kv_revision(settings)
    stage.baseline = await stage.snapshot()
    stage.instances = await stage.service_instances()
    for _ in range(30):  # each service publishes its figures every 0.3 s
        if {instance.split("/")[0] for instance in stage.instances} == set(direct):
            break
        await asyncio.sleep(0.1)
        stage.instances = await stage.service_instances()
    stage.output_mark = len(stack.output)
    stage.tally.clear()
    yield stage
    try:
        assert stack.process.returncode is None, "the launcher exited"  # said plainly, before the summary
        _show(request, await _summary(stage))
        await _assert_nothing_else_changed(stage)
    finally:
        try:
            await _cleanup(gateway, stack.api_key, settings)
        finally:
            await gateway.close()
            for channel in direct.values():
                await channel.close()


async def _summary(stage: Hostile) -> str:
    """One line: calls made, statuses seen, processes that crashed, rows changed."""
    crashed = await stage.crashed()
    rows = sum(changed_rows(stage.baseline, await stage.snapshot()).values())
    calls = sum(stage.tally.values())
    return (
        f"hostile inputs: {calls} calls, statuses {dict(stage.tally.most_common())}, "
        f"processes crashed {crashed}, rows changed {rows}"
    )


def _show(request: pytest.FixtureRequest, line: str) -> None:
    """Print ``line``, even when pytest captures output."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # shown even when output is captured
            print(f"\n{line}")
    else:
        print(line)


async def _assert_nothing_else_changed(hostile: Hostile) -> None:
    """Every process survived the package's tests, and no row outside the attacker's tenants changed."""
    assert hostile.stack.process.returncode is None, "the launcher exited"
    assert hostile.restarts() == []
    assert await hostile.crashed() == 0
    await hostile.assert_healthy()
    assert {i.split("/")[0] for i in hostile.instances} == set(hostile.direct), hostile.instances
    now = await hostile.snapshot()
    changed = changed_rows(hostile.baseline, now)
    assert changed == {}, f"rows outside the attacker's tenants changed: {changed}"
    # The digest does hold the victim's rows: leaving the victim out changes each of its tables.
    without_victim = await hostile.snapshot(exclude=(*THROWAWAY, VICTIM))
    victims_tables = {
        "kv.entries",
        "tenants.records",
        "vector.collections",
        "vector.points",
        "admin.api_keys",
    }
    assert victims_tables | {"tenants.tenants"} <= set(changed_rows(without_victim, now))

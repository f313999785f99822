"""A tenant's delete and re-creation against writes that race them, through the real processes."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from shared.api.callers import Caller
from tests.conftest import signed_channel
from tests.support.calls import bearer
from tests.support.documents import struct
from tests.support.errors import error_info, field_violations

pytestmark = pytest.mark.e2e

_SCOPES = frozenset({"tenants:read", "tenants:write", "kv:read", "kv:write"})


def record(record_id: str, data: dict) -> tenants_pb2.Record:
    return tenants_pb2.Record(collection="c", id=record_id, data=struct(data))


@pytest.fixture
async def past_the_gateway(stack, slug):
    """Record and KV stubs calling the services directly as ``slug``: calls the gateway already let in."""
    caller = Caller(slug, _SCOPES, "key-of-a-call-in-flight")
    async with (
        signed_channel(stack.ports["tenants"], caller) as tenants_channel,
        signed_channel(stack.ports["kv"], caller) as kv_channel,
    ):
        yield tenants_pb2_grpc.RecordServiceStub(tenants_channel), kv_pb2_grpc.KvServiceStub(kv_channel)


async def test_a_recreated_tenant_never_sees_what_was_written_for_its_predecessor_after_the_delete(
    gw_tenants, gateway_channel, admin_metadata, make_key, slug, past_the_gateway, gw_admin
):
    records, kv = past_the_gateway
    await make_key(slug, *_SCOPES)
    await records.CreateRecord(tenants_pb2.CreateRecordRequest(record=record("before", {"n": 1})))
    gone = await gw_tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=admin_metadata
    )
    assert (gone.records_deleted, gone.api_keys_deleted) == (1, 1)
    # Calls already past the gateway when the delete ran (its key cache keeps a
    # revoked key for up to a second) still land, for a tenant that is gone.
    await records.CreateRecord(tenants_pb2.CreateRecordRequest(record=record("orphan", {"after": "delete"})))
    await kv.Put(kv_pb2.PutRequest(namespace="ns", key="orphan", value=b"late"))

    new_key, _ = await make_key(slug, *_SCOPES)  # the same slug, registered again
    metadata = bearer(new_key)
    gw_records = tenants_pb2_grpc.RecordServiceStub(gateway_channel)
    gw_kv = kv_pb2_grpc.KvServiceStub(gateway_channel)
    for call in (
        gw_records.GetRecord(tenants_pb2.GetRecordRequest(collection="c", id="orphan"), metadata=metadata),
        gw_kv.Get(kv_pb2.GetRequest(namespace="ns", key="orphan"), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="c", include_total_size=True), metadata=metadata
    )
    assert (list(listed.records), listed.total_size) == ([], 0)
    events = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(target_prefix=f"tenant/{slug}", page_size=10),
        metadata=admin_metadata,
    )
    created = next(e for e in events.events if e.action.endswith("CreateTenant"))  # newest first
    removed = json_format.MessageToDict(created.details)["leftovers_removed"]
    assert (removed["records"], removed["kv_keys"]) == (1, 1)


async def test_a_record_written_while_a_plain_delete_waits_makes_the_delete_refuse(
    gw_tenants, admin_metadata, slug, past_the_gateway, settings
):
    records, _ = past_the_gateway
    await gw_tenants.CreateTenant(
        tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug)), metadata=admin_metadata
    )
    owner = await asyncpg.connect(settings.migrate_database_url)
    try:
        # Hold the tenant's row: the delete counts nothing, then waits for the row.
        holder = owner.transaction()
        await holder.start()
        await owner.execute("SELECT 1 FROM tenants.tenants WHERE slug = $1 FOR UPDATE", slug)
        delete = asyncio.ensure_future(
            gw_tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(slug=slug), metadata=admin_metadata)
        )
        await asyncio.sleep(0.5)
        assert not delete.done()
        await records.CreateRecord(tenants_pb2.CreateRecordRequest(record=record("racer", {"n": 1})))
        await holder.rollback()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await delete
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(caught.value)
        assert info.reason == "TENANT_NOT_EMPTY" and info.metadata["records"] == "1"
        assert "records: 1" in (caught.value.details() or "")
        assert await owner.fetchval("SELECT count(*) FROM tenants.tenants WHERE slug = $1", slug) == 1
        assert await owner.fetchval("SELECT count(*) FROM tenants.records WHERE tenant = $1", slug) == 1
    finally:
        await owner.close()


async def test_a_field_named_twice_in_an_update_mask_is_invalid(
    gw_tenants, admin_metadata, make_key, slug, gateway_channel
):
    api_key, _ = await make_key(slug, *_SCOPES)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, plan="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["plan", "plan"]),
            ),
            metadata=admin_metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths[1]" in field_violations(caught.value)
    gw_records = tenants_pb2_grpc.RecordServiceStub(gateway_channel)
    made = await gw_records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=record("r", {"a": 1})), metadata=bearer(api_key)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=record("r", {"a": 2}), update_mask=field_mask_pb2.FieldMask(paths=["data.a", "data.a"])
            ),
            metadata=bearer(api_key),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths[1]" in field_violations(caught.value)
    got = await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="c", id="r"), metadata=bearer(api_key)
    )
    assert got.record.etag == made.record.etag


async def test_a_masked_path_given_as_null_is_set_to_null_and_an_absent_one_removed(
    make_key, slug, gateway_channel
):
    api_key, _ = await make_key(slug, *_SCOPES)
    gw_records = tenants_pb2_grpc.RecordServiceStub(gateway_channel)
    await gw_records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=record("r", {"s": "x", "t": 1, "n": 1})),
        metadata=bearer(api_key),
    )
    updated = await gw_records.UpdateRecord(
        tenants_pb2.UpdateRecordRequest(
            record=tenants_pb2.Record(
                collection="c", id="r", data=json_format.Parse(json.dumps({"s": None}), struct_pb2.Struct())
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["data.s", "data.t"]),
        ),
        metadata=bearer(api_key),
    )
    assert json_format.MessageToDict(updated.record.data) == {"s": None, "n": 1}

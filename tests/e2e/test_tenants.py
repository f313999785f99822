"""TenantService and RecordService through the real gateway and processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from strata.common.v1 import filter_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from shared.api.callers import ADMIN_SCOPE, OPERATOR_SCOPE, SCOPES, Caller
from tests.chaos import provision_tenant
from tests.conftest import signed_channel
from tests.support.calls import assert_invalid, bearer, rpc_error
from tests.support.documents import all_of, any_of, cond, none_of, struct
from tests.support.errors import error_info, field_violations
from tests.support.stack import Stack, remove_data, start_stack

pytestmark = pytest.mark.e2e

T = TypeVar("T")

Status = tenants_pb2.TenantStatus


@pytest.fixture
def slug() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def writer(make_key, slug) -> tuple[tuple[str, str], ...]:
    """Metadata of a key with tenants:read and tenants:write for a fresh tenant."""
    api_key, _ = await make_key(slug, "tenants:read", "tenants:write", "kv:read", "kv:write")
    return bearer(api_key)


# -- the registry -------------------------------------------------------------


async def test_create_get_and_list_tenants(gw_tenants, admin_metadata, slug):
    created = (
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(
                tenant=tenants_pb2.Tenant(
                    slug=slug, display_name="Acme", plan="pro", metadata=struct({"region": "eu"})
                )
            ),
            metadata=admin_metadata,
        )
    ).tenant
    assert created.status == Status.TENANT_STATUS_ACTIVE and created.etag and uuid.UUID(created.id)
    by_id = await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(id=created.id), metadata=admin_metadata)
    by_slug = await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert by_id.tenant == by_slug.tenant == created
    assert json_format.MessageToDict(created.metadata) == {"region": "eu"}
    seen, token = [], ""
    while True:
        page = await gw_tenants.ListTenants(
            tenants_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=admin_metadata
        )
        seen.extend(t.slug for t in page.tenants)
        token = page.next_page_token
        if not token:
            break
    assert slug in seen and seen == sorted(seen) and len(seen) == len(set(seen))


async def test_a_taken_slug_is_already_exists(gw_tenants, admin_metadata, slug):
    request = tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug))
    await gw_tenants.CreateTenant(request, metadata=admin_metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.CreateTenant(request, metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    "bad", ["", "UPPER", "-dash", "a b", "x" * 64, "é", "a'; DROP TABLE tenants.tenants; --"]
)
async def test_bad_slugs_are_invalid_argument(gw_tenants, admin_metadata, bad):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=bad)), metadata=admin_metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant.slug" in field_violations(caught.value)


async def test_update_changes_only_masked_fields_and_checks_the_etag(gw_tenants, admin_metadata, slug):
    created = (
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, display_name="Old", plan="free")
            ),
            metadata=admin_metadata,
        )
    ).tenant
    updated = (
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, display_name="New", plan="ignored", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=admin_metadata,
        )
    ).tenant
    assert (updated.display_name, updated.plan) == ("New", "free") and updated.etag != created.etag
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, plan="pro", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
            ),
            metadata=admin_metadata,
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug), update_mask=field_mask_pb2.FieldMask(paths=["slug"])
            ),
            metadata=admin_metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def list_every_tenant(gw_tenants, metadata, status: int = 0) -> list[tenants_pb2.Tenant]:
    """Every tenant ListTenants returns for ``status`` (0: all), walked page by page."""
    found: list[tenants_pb2.Tenant] = []
    token = ""
    while True:
        page = await gw_tenants.ListTenants(
            tenants_pb2.ListTenantsRequest(status=status, page_size=50, page_token=token), metadata=metadata
        )
        found.extend(page.tenants)
        token = page.next_page_token
        if not token:
            return found


async def test_list_tenants_by_status_returns_exactly_the_tenants_with_that_status(
    gw_tenants, admin_metadata
):
    prefix = f"st-{uuid.uuid4().hex[:8]}"
    wanted = {f"{prefix}-a{i}": Status.TENANT_STATUS_ACTIVE for i in range(3)}
    wanted |= {f"{prefix}-s{i}": Status.TENANT_STATUS_SUSPENDED for i in range(2)}
    for slug, status in wanted.items():
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, status=status)),
            metadata=admin_metadata,
        )
    # One changes status after creation: the filter reads the current status.
    moved = f"{prefix}-a2"
    await gw_tenants.UpdateTenant(
        tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(slug=moved, status=Status.TENANT_STATUS_SUSPENDED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=admin_metadata,
    )
    wanted[moved] = Status.TENANT_STATUS_SUSPENDED
    for status in (Status.TENANT_STATUS_ACTIVE, Status.TENANT_STATUS_SUSPENDED):
        listed = await list_every_tenant(gw_tenants, admin_metadata, status)
        assert {t.status for t in listed} <= {status}
        mine = {t.slug for t in listed if t.slug.startswith(prefix)}
        assert mine == {slug for slug, s in wanted.items() if s == status}, Status.Name(status)
    everyone = {t.slug for t in await list_every_tenant(gw_tenants, admin_metadata)}
    assert set(wanted) <= everyone


async def test_list_tenants_with_an_unknown_status_is_invalid_argument(gw_tenants, admin_metadata):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.ListTenants(tenants_pb2.ListTenantsRequest(status=7), metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status" in field_violations(caught.value)


async def test_delete_tenant_with_a_stale_etag_is_aborted_and_with_the_current_etag_deletes(
    gw_tenants, admin_metadata, slug
):
    created = (
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, display_name="v1")),
            metadata=admin_metadata,
        )
    ).tenant
    updated = (
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, display_name="v2"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=admin_metadata,
        )
    ).tenant
    assert updated.etag != created.etag
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.DeleteTenant(
            tenants_pb2.DeleteTenantRequest(slug=slug, etag=created.etag), metadata=admin_metadata
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value).reason == "ETAG_MISMATCH"
    still = await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert still.tenant == updated
    await gw_tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=slug, etag=updated.etag), metadata=admin_metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# Every scope a key can hold but admin.
NON_ADMIN_SCOPES = frozenset(SCOPES - {ADMIN_SCOPE, OPERATOR_SCOPE})
TENANT_METHODS = (
    "CreateTenant",
    "GetTenant",
    "ListTenants",
    "UpdateTenant",
    "DeleteTenant",
    "DeclareIndex",
    "ListIndexes",
)


def tenant_service_call(
    stub: tenants_pb2_grpc.TenantServiceStub, method: str, target: str, fresh: str, collection: str
):
    """A call of TenantService ``method`` that would change ``target``, make ``fresh`` or index ``collection``."""
    requests = {
        "CreateTenant": tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=fresh)),
        "GetTenant": tenants_pb2.GetTenantRequest(slug=target),
        "ListTenants": tenants_pb2.ListTenantsRequest(),
        "UpdateTenant": tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(
                slug=target, display_name="taken over", status=Status.TENANT_STATUS_SUSPENDED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "status"]),
        ),
        "DeleteTenant": tenants_pb2.DeleteTenantRequest(slug=target, cascade=True),
        "DeclareIndex": tenants_pb2.DeclareIndexRequest(
            index=tenants_pb2.RecordIndex(collection=collection, path="owner")
        ),
        "ListIndexes": tenants_pb2.ListIndexesRequest(collection=collection),
    }
    return getattr(stub, method), requests[method]


async def registry_state(gw_tenants, admin_metadata, target: str, fresh: str, collection: str) -> tuple:
    """What a TenantService call could change: ``target`` as stored, whether ``fresh`` exists, the indexes."""
    tenant = (
        await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=target), metadata=admin_metadata)
    ).tenant
    try:
        await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=fresh), metadata=admin_metadata)
        fresh_exists = True
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        fresh_exists = False
    indexes = await gw_tenants.ListIndexes(
        tenants_pb2.ListIndexesRequest(collection=collection), metadata=admin_metadata
    )
    return tenant, fresh_exists, list(indexes.indexes)


@pytest.mark.parametrize("via", ["gateway", "service"])
@pytest.mark.parametrize("method", TENANT_METHODS)
async def test_every_tenant_method_without_the_admin_scope_is_permission_denied_and_changes_nothing(
    gw_tenants, admin_metadata, make_key, stack, slug, method, via
):
    assert set(TENANT_METHODS) == set(
        tenants_pb2.DESCRIPTOR.services_by_name["TenantService"].methods_by_name
    )
    api_key, key_id = await make_key(slug, *sorted(NON_ADMIN_SCOPES))
    fresh, collection = f"t-{uuid.uuid4().hex[:10]}", f"c{uuid.uuid4().hex[:10]}"
    before = await registry_state(gw_tenants, admin_metadata, slug, fresh, collection)
    caller = Caller(slug, NON_ADMIN_SCOPES, key_id)
    # "service": straight to the tenants process with a signed identity, past the gateway's own check.
    async with signed_channel(stack.ports["tenants"], caller) as direct:
        stub = gw_tenants if via == "gateway" else tenants_pb2_grpc.TenantServiceStub(direct)
        metadata = bearer(api_key) if via == "gateway" else ()
        call, request = tenant_service_call(stub, method, slug, fresh, collection)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request, metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await registry_state(gw_tenants, admin_metadata, slug, fresh, collection) == before


async def test_tenant_calls_need_the_admin_scope(gw_tenants, writer):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=writer)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def only_one_wins(attempt: Callable[[int], Awaitable[T]], writers: int = 8) -> T:
    """Run ``attempt(0..writers-1)`` at once: exactly one succeeds, every other is ABORTED; the winner's answer."""

    async def outcome(i: int) -> T | grpc.StatusCode:
        try:
            return await attempt(i)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    outcomes = await asyncio.gather(*(outcome(i) for i in range(writers)))
    winners = [o for o in outcomes if not isinstance(o, grpc.StatusCode)]
    assert len(winners) == 1, outcomes
    assert [o for o in outcomes if isinstance(o, grpc.StatusCode)] == [grpc.StatusCode.ABORTED] * (
        writers - 1
    )
    return winners[0]


async def test_concurrent_tenant_updates_with_one_etag_let_exactly_one_win(gw_tenants, admin_metadata, slug):
    created = (
        await gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, display_name="start")),
            metadata=admin_metadata,
        )
    ).tenant

    async def attempt(i: int) -> tenants_pb2.Tenant:
        response = await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, display_name=f"writer-{i}", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=admin_metadata,
        )
        return response.tenant

    winner = await only_one_wins(attempt)
    stored = await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert stored.tenant == winner


async def test_a_suspended_tenants_keys_are_refused_until_it_is_active_again(
    gw_tenants, gw_records, admin_metadata, writer, slug
):
    request = tenants_pb2.ListRecordsRequest(collection="c")
    await gw_records.ListRecords(request, metadata=writer)

    async def set_status(status: int) -> None:
        await gw_tenants.UpdateTenant(
            tenants_pb2.UpdateTenantRequest(
                tenant=tenants_pb2.Tenant(slug=slug, status=status),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=admin_metadata,
        )

    async def wait_for(code: grpc.StatusCode | None) -> None:
        deadline = time.monotonic() + 3
        while True:
            try:
                await gw_records.ListRecords(request, metadata=writer)
                got = None
            except grpc.aio.AioRpcError as exc:
                got = exc.code()
                if code is not None:
                    assert error_info(exc).reason == "TENANT_SUSPENDED"
            if got == code:
                return
            assert time.monotonic() < deadline, f"still {got} after 3 s"
            await asyncio.sleep(0.1)

    await set_status(Status.TENANT_STATUS_SUSPENDED)
    await wait_for(grpc.StatusCode.PERMISSION_DENIED)
    await set_status(Status.TENANT_STATUS_ACTIVE)
    await wait_for(None)


async def test_deleting_a_tenant_with_data_needs_cascade_which_removes_everything(
    gw_tenants, gw_records, gw_kv, admin_metadata, writer, slug, settings
):
    await gw_records.CreateRecord(
        tenants_pb2.CreateRecordRequest(
            record=tenants_pb2.Record(collection="c", id="r1", data=struct({"a": 1}))
        ),
        metadata=writer,
    )
    await gw_kv.Put(kv_pb2.PutRequest(namespace="ns", key="k", value=b"v"), metadata=writer)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(slug=slug), metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "TENANT_NOT_EMPTY"
    assert (info.metadata["records"], info.metadata["kv_keys"], info.metadata["api_keys"]) == ("1", "1", "1")
    gone = await gw_tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=admin_metadata
    )
    assert (gone.records_deleted, gone.kv_keys_deleted, gone.api_keys_deleted) == (1, 1, 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await asyncio.sleep(1.2)  # the gateway's key cache
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_kv.Get(kv_pb2.GetRequest(namespace="ns", key="k"), metadata=writer)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    owner = await asyncpg.connect(settings.migrate_database_url)
    try:
        assert await owner.fetchval("SELECT count(*) FROM tenants.records WHERE tenant = $1", slug) == 0
        assert await owner.fetchval("SELECT count(*) FROM kv.entries WHERE tenant = $1", slug) == 0
    finally:
        await owner.close()


# -- records ------------------------------------------------------------------


async def create(
    gw_records, metadata, collection: str, data: dict, record_id: str = "", request_id: str = ""
):
    response = await gw_records.CreateRecord(
        tenants_pb2.CreateRecordRequest(
            record=tenants_pb2.Record(collection=collection, id=record_id, data=struct(data)),
            request_id=request_id,
        ),
        metadata=metadata,
    )
    return response.record


async def test_record_crud_with_revisions_and_etags(gw_records, writer):
    made = await create(gw_records, writer, "docs", {"title": "a", "n": 1}, "doc-1")
    assert made.revision == 1 and made.etag  # the etag is opaque
    got = (
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="docs", id="doc-1"), metadata=writer
        )
    ).record
    assert json_format.MessageToDict(got.data) == {"title": "a", "n": 1}
    replaced = (
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(
                    collection="docs", id="doc-1", data=struct({"title": "b"}), etag=made.etag
                )
            ),
            metadata=writer,
        )
    ).record
    assert json_format.MessageToDict(replaced.data) == {"title": "b"} and replaced.revision == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(collection="docs", id="doc-1", data=struct({}), etag=made.etag)
            ),
            metadata=writer,
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.DeleteRecord(
            tenants_pb2.DeleteRecordRequest(collection="docs", id="doc-1", etag=made.etag), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    deleted = await gw_records.DeleteRecord(
        tenants_pb2.DeleteRecordRequest(collection="docs", id="doc-1", etag=replaced.etag), metadata=writer
    )
    assert deleted.record.id == "doc-1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="docs", id="doc-1"), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "RECORD_NOT_FOUND"


async def test_update_with_a_mask_changes_only_those_paths(gw_records, writer):
    await create(gw_records, writer, "docs", {"a": {"b": 1, "c": 2}, "d": 3, "e": 4}, "m1")
    updated = (
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(collection="docs", id="m1", data=struct({"a": {"b": 10}, "d": 99})),
                update_mask=field_mask_pb2.FieldMask(paths=["data.a.b", "data.e"]),
            ),
            metadata=writer,
        )
    ).record
    assert json_format.MessageToDict(updated.data) == {"a": {"b": 10, "c": 2}, "d": 3}


async def test_a_duplicate_id_is_already_exists_but_a_retried_request_id_is_idempotent(gw_records, writer):
    first = await create(gw_records, writer, "docs", {"x": 1}, request_id="req-1")
    again = await create(gw_records, writer, "docs", {"x": 1}, request_id="req-1")
    assert again.id == first.id and again.revision == 1
    await create(gw_records, writer, "docs", {}, "fixed")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(gw_records, writer, "docs", {}, "fixed")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).reason == "RECORD_ALREADY_EXISTS"


async def test_batch_get_returns_found_in_order_and_lists_missing(gw_records, writer):
    for i in range(3):
        await create(gw_records, writer, "docs", {"i": i}, f"b{i}")
    response = await gw_records.BatchGetRecords(
        tenants_pb2.BatchGetRecordsRequest(collection="docs", ids=["b2", "nope", "b0"]), metadata=writer
    )
    assert [r.id for r in response.records] == ["b2", "b0"] and list(response.missing_ids) == ["nope"]


async def test_list_filters_orders_and_pages(gw_records, writer):
    for i in range(12):
        data = {"score": i, "kind": "even" if i % 2 == 0 else "odd", "tags": ["t"] if i % 3 == 0 else []}
        if i == 5:
            del data["score"]
        await create(gw_records, writer, "scores", data, f"s{i:02d}")
    request = tenants_pb2.ListRecordsRequest(
        collection="scores",
        filter=filter_pb2.Filter(
            all_of=filter_pb2.FilterList(
                filters=[cond("kind", "OPERATOR_EQ", "even"), cond("score", "OPERATOR_GTE", 2)]
            )
        ),
        order_by="data.score desc",
        page_size=2,
        include_total_size=True,
    )
    seen = []
    while True:
        page = await gw_records.ListRecords(request, metadata=writer)
        assert page.total_size == 5
        seen.extend(r.id for r in page.records)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == ["s10", "s08", "s06", "s04", "s02"]
    everything = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="scores", order_by="data.score", page_size=5),
        metadata=writer,
    )
    walked, token = [], ""
    while True:
        page = await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(
                collection="scores", order_by="data.score", page_size=5, page_token=token
            ),
            metadata=writer,
        )
        walked.extend(r.id for r in page.records)
        token = page.next_page_token
        if not token:
            break
    assert walked[-1] == "s05", "a record without the sort key sorts last"
    assert walked[:3] == [r.id for r in everything.records][:3] == ["s00", "s01", "s02"]
    assert len(walked) == 12


async def test_every_filter_operator_works_through_the_gateway(gw_records, writer):
    docs = {
        "f1": {"name": "alpha", "n": 1, "tags": ["x", "y"], "nested": {"ok": True}},
        "f2": {"name": "beta", "n": 2.5, "tags": ["y"], "empty": None},
        "f3": {"name": "alphabet", "n": 3, "tags": []},
    }
    for record_id, data in docs.items():
        await create(gw_records, writer, "ops", data, record_id)
    cases = [
        (cond("name", "OPERATOR_EQ", "beta"), ["f2"]),
        (cond("name", "OPERATOR_NE", "beta"), ["f1", "f3"]),
        (cond("n", "OPERATOR_LT", 2.5), ["f1"]),
        (cond("n", "OPERATOR_LTE", 2.5), ["f1", "f2"]),
        (cond("n", "OPERATOR_GT", 1), ["f2", "f3"]),
        (cond("n", "OPERATOR_GTE", 3), ["f3"]),
        (cond("name", "OPERATOR_IN", values=["alpha", "beta", "zeta"]), ["f1", "f2"]),
        (cond("tags", "OPERATOR_CONTAINS", "y"), ["f1", "f2"]),
        (cond("name", "OPERATOR_CONTAINS", "phab"), ["f3"]),
        (cond("empty", "OPERATOR_EXISTS", True), ["f2"]),
        (cond("nested.ok", "OPERATOR_EXISTS", False), ["f2", "f3"]),
        (cond("name", "OPERATOR_PREFIX", "alpha"), ["f1", "f3"]),
        (
            filter_pb2.Filter(
                any_of=filter_pb2.FilterList(
                    filters=[cond("n", "OPERATOR_EQ", 1), cond("n", "OPERATOR_EQ", 3)]
                )
            ),
            ["f1", "f3"],
        ),
        (
            filter_pb2.Filter(
                none_of=filter_pb2.FilterList(filters=[cond("name", "OPERATOR_PREFIX", "alpha")])
            ),
            ["f2"],
        ),
    ]
    for filter_, expected in cases:
        page = await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(collection="ops", filter=filter_, order_by="id"), metadata=writer
        )
        assert [r.id for r in page.records] == expected, filter_


async def test_another_tenant_sees_nothing_by_id_filter_or_page_token(gw_records, writer, make_key):
    for i in range(3):
        await create(gw_records, writer, "private", {"secret": i}, f"p{i}")
    other_key, _ = await make_key(f"t-{uuid.uuid4().hex[:10]}", "tenants:read", "tenants:write")
    other = bearer(other_key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="private", id="p0"), metadata=other
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    page = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(
            collection="private", filter=cond("secret", "OPERATOR_GTE", 0), include_total_size=True
        ),
        metadata=other,
    )
    assert list(page.records) == [] and page.total_size == 0
    mine = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="private", page_size=1), metadata=writer
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(
                collection="private", page_size=1, page_token=mine.next_page_token
            ),
            metadata=other,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.DeleteRecord(
            tenants_pb2.DeleteRecordRequest(collection="private", id="p0"), metadata=other
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    still = await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="private", id="p0"), metadata=writer
    )
    assert json_format.MessageToDict(still.record.data) == {"secret": 0}


async def test_a_token_with_a_changed_filter_is_rejected(gw_records, writer):
    for i in range(3):
        await create(gw_records, writer, "tok", {"i": i}, f"k{i}")
    page = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="tok", page_size=1), metadata=writer
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(
                collection="tok",
                page_size=1,
                page_token=page.next_page_token,
                filter=cond("i", "OPERATOR_GT", 0),
            ),
            metadata=writer,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(caught.value)


def nested(depth: int) -> filter_pb2.Filter:
    node = cond("a", "OPERATOR_EQ", 1)
    for _ in range(depth):
        node = filter_pb2.Filter(all_of=filter_pb2.FilterList(filters=[node]))
    return node


@pytest.mark.parametrize(
    "hostile",
    [
        cond("name", "OPERATOR_EQ", "'; DROP TABLE tenants.records; --"),
        cond("name", "OPERATOR_PREFIX", "%_\\"),
        cond("name", "OPERATOR_EQ", "$1"),
    ],
)
async def test_hostile_filter_values_are_plain_data(gw_records, writer, hostile):
    await create(gw_records, writer, "hostile", {"name": "ok"}, "h1")
    page = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="hostile", filter=hostile), metadata=writer
    )
    assert list(page.records) == []
    assert (
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="hostile", id="h1"), metadata=writer
        )
    ).record.id == "h1"


@pytest.mark.parametrize(
    "bad",
    [
        nested(9),
        cond("name", "OPERATOR_EQ", "nul\x00byte"),
        cond("name", "OPERATOR_IN", values=list(range(1001))),
        cond("a b", "OPERATOR_EQ", 1),
        cond("name", "OPERATOR_UNSPECIFIED", 1),
        cond("name", "OPERATOR_PREFIX", 5),
    ],
)
async def test_malformed_filters_are_invalid_argument(gw_records, writer, bad):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(collection="x", filter=bad), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any(field.startswith("filter") for field in field_violations(caught.value))


async def test_oversized_and_nul_documents_are_rejected_and_not_written(gw_records, writer):
    for data, record_id in (({"blob": "x" * (1024 * 1024)}, "big"), ({"s": "a\x00b"}, "nul")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(gw_records, writer, "limits", data, record_id)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    page = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="limits", include_total_size=True), metadata=writer
    )
    assert page.total_size == 0


@pytest.mark.parametrize(
    ("collection", "record_id"), [("", "x"), ("a b", "x"), ("ok", "a/b"), ("ok", "x" * 129)]
)
async def test_bad_names_are_invalid_argument(gw_records, writer, collection, record_id):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection=collection, id=record_id), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_pagination_under_concurrent_inserts_neither_skips_nor_repeats(gw_records, writer):
    for i in range(0, 60, 2):
        await create(gw_records, writer, "busy", {"n": i}, f"r{i:03d}")
    stop = asyncio.Event()

    async def inserter() -> None:
        i = 1
        while not stop.is_set() and i < 60:
            await create(gw_records, writer, "busy", {"n": i}, f"r{i:03d}")
            i += 2

    task = asyncio.create_task(inserter())
    seen, token = [], ""
    try:
        while True:
            page = await gw_records.ListRecords(
                tenants_pb2.ListRecordsRequest(
                    collection="busy", order_by="id", page_size=4, page_token=token
                ),
                metadata=writer,
            )
            seen.extend(r.id for r in page.records)
            token = page.next_page_token
            if not token:
                break
    finally:
        stop.set()
        await task
    assert len(seen) == len(set(seen))
    assert {f"r{i:03d}" for i in range(0, 60, 2)} <= set(seen)


async def test_reads_after_each_write_see_that_write_through_the_cache(gw_records, writer):
    await create(gw_records, writer, "cached", {"v": 0}, "c1")
    for i in range(1, 15):
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(collection="cached", id="c1", data=struct({"v": i}))
            ),
            metadata=writer,
        )
        got = await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="cached", id="c1"), metadata=writer
        )
        batch = await gw_records.BatchGetRecords(
            tenants_pb2.BatchGetRecordsRequest(collection="cached", ids=["c1"]), metadata=writer
        )
        assert json_format.MessageToDict(got.record.data) == {"v": i} and got.record.revision == i + 1
        assert json_format.MessageToDict(batch.records[0].data) == {"v": i}
    await gw_records.DeleteRecord(
        tenants_pb2.DeleteRecordRequest(collection="cached", id="c1"), metadata=writer
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="cached", id="c1"), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    batch = await gw_records.BatchGetRecords(
        tenants_pb2.BatchGetRecordsRequest(collection="cached", ids=["c1"]), metadata=writer
    )
    assert list(batch.missing_ids) == ["c1"]
    # Re-created: revision starts again at 1, yet the cache's tombstone does not hide it.
    again = await create(gw_records, writer, "cached", {"v": "again"}, "c1")
    got = await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="cached", id="c1"), metadata=writer
    )
    assert got.record.revision == again.revision == 1
    assert json_format.MessageToDict(got.record.data) == {"v": "again"}


async def test_a_recreated_tenant_does_not_see_its_predecessors_cached_records(
    gw_tenants, gw_records, admin_metadata, make_key, slug
):
    key, _ = await make_key(slug, "tenants:read", "tenants:write")
    await create(gw_records, bearer(key), "c", {"old": True}, "r1")
    await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="c", id="r1"), metadata=bearer(key)
    )  # cached
    await gw_tenants.DeleteTenant(
        tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=admin_metadata
    )
    new_key, _ = await make_key(slug, "tenants:read", "tenants:write")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.GetRecord(
            tenants_pb2.GetRecordRequest(collection="c", id="r1"), metadata=bearer(new_key)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_record_updates_with_one_etag_let_exactly_one_win(gw_records, writer):
    made = await create(gw_records, writer, "race", {"writer": None}, "r1")

    async def attempt(i: int) -> tenants_pb2.Record:
        response = await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(
                    collection="race", id="r1", data=struct({"writer": i}), etag=made.etag
                )
            ),
            metadata=writer,
        )
        return response.record

    winner = await only_one_wins(attempt)
    assert winner.revision == 2
    cached = await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="race", id="r1"), metadata=writer
    )
    # ListRecords reads Postgres, not the cache: what is stored.
    listed = await gw_records.ListRecords(tenants_pb2.ListRecordsRequest(collection="race"), metadata=writer)
    assert cached.record == winner and list(listed.records) == [winner]


# -- nested filters -----------------------------------------------------------

NESTED_DOCS: dict[str, dict] = {
    "n01": {"a": 1, "b": "x", "c": True},
    "n02": {"a": 1, "b": "y", "c": False},
    "n03": {"a": 2, "b": "x", "c": True},
    "n04": {"a": 2, "b": "y", "c": False},
    "n05": {"a": 3, "b": "xy", "c": True},
    "n06": {"a": 3, "b": "z"},
    "n07": {"b": "x", "c": False},
    "n08": {"a": 0, "c": True},
    "n09": {"a": 4, "b": "yx", "c": False},
    "n10": {},
}


def has(doc: dict, key: str, value) -> bool:
    """What OPERATOR_EQ means: the key is there with that value (and that JSON type: True is not 1)."""
    return key in doc and type(doc[key]) is type(value) and doc[key] == value


NESTED_CASES = {
    "and of (or of two, not of one)": (
        all_of(
            any_of(cond("a", "OPERATOR_EQ", 1), cond("b", "OPERATOR_EQ", "x")),
            none_of(cond("c", "OPERATOR_EQ", True)),
        ),
        lambda d: (has(d, "a", 1) or has(d, "b", "x")) and not has(d, "c", True),
    ),
    "or of ands": (
        any_of(
            all_of(cond("a", "OPERATOR_GTE", 2), cond("b", "OPERATOR_EQ", "y")),
            all_of(cond("a", "OPERATOR_LT", 1), cond("c", "OPERATOR_EQ", True)),
        ),
        lambda d: (
            (d.get("a", -99) >= 2 and has(d, "b", "y")) or ("a" in d and d["a"] < 1 and has(d, "c", True))
        ),
    ),
    "not of an or": (
        none_of(any_of(cond("a", "OPERATOR_EQ", 1), cond("b", "OPERATOR_PREFIX", "x"))),
        lambda d: not (has(d, "a", 1) or str(d.get("b", "")).startswith("x")),
    ),
    "and of (or of (and, not exists), ne)": (
        all_of(
            any_of(
                all_of(cond("a", "OPERATOR_GT", 1), cond("c", "OPERATOR_EQ", True)),
                none_of(cond("b", "OPERATOR_EXISTS")),
            ),
            cond("b", "OPERATOR_NE", "z"),
        ),
        lambda d: ((d.get("a", -99) > 1 and has(d, "c", True)) or "b" not in d) and d.get("b") != "z",
    ),
    "or of (not exists, and with in)": (
        any_of(
            none_of(cond("a", "OPERATOR_EXISTS")),
            all_of(cond("a", "OPERATOR_IN", values=[1, 3]), cond("c", "OPERATOR_EQ", False)),
        ),
        lambda d: "a" not in d or (d["a"] in (1, 3) and has(d, "c", False)),
    ),
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
async def test_nested_filter_combinations_match_the_same_logic_in_python(gw_records, writer, case):
    for record_id, data in NESTED_DOCS.items():
        await create(gw_records, writer, "nested", data, record_id)
    filter_, matches = NESTED_CASES[case]
    expected = sorted(record_id for record_id, data in NESTED_DOCS.items() if matches(data))
    assert 0 < len(expected) < len(NESTED_DOCS), "a case that tells nothing apart"
    page = await gw_records.ListRecords(
        tenants_pb2.ListRecordsRequest(collection="nested", filter=filter_, order_by="id"), metadata=writer
    )
    assert [r.id for r in page.records] == expected


@pytest.mark.parametrize(
    "bad",
    [
        nested(9),
        cond("a b", "OPERATOR_EQ", 1),
        cond("name", "OPERATOR_PREFIX", 5),
        cond("name", "OPERATOR_IN", values=list(range(1001))),
    ],
)
async def test_filter_errors_from_list_records_carry_the_tenants_error_domain(gw_records, writer, bad):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(collection="x", filter=bad), metadata=writer
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).domain == "strata.tenants.v1"


# -- the records cache across tenants processes -----------------------------

RECORD_SCOPES = frozenset({"tenants:read", "tenants:write"})


@pytest.fixture(scope="module")
async def two_tenants_processes(settings) -> AsyncIterator[Stack]:
    """A stack whose gateway balances over two tenants processes (round robin)."""
    stack = await start_stack(
        settings,
        STRATA_TENANTS_REPLICAS="2",
        STRATA_RATE_LIMIT_RPS="100000",
        STRATA_RATE_LIMIT_BURST="100000",
    )
    yield stack
    await stack.stop()
    remove_data(stack)


def tenants_ports(stack: Stack) -> list[int]:
    """The two tenants processes' ports (process i listens on the port + 100 x i)."""
    return [stack.ports["tenants"], stack.ports["tenants"] + 100]


async def expect_missing(
    stubs: list[tenants_pb2_grpc.RecordServiceStub], collection: str, record_id: str
) -> None:
    """Each stub answers NOT_FOUND for the record, in GetRecord and BatchGetRecords."""
    for stub in stubs:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRecord(
                tenants_pb2.GetRecordRequest(collection=collection, id=record_id), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        batch = await stub.BatchGetRecords(
            tenants_pb2.BatchGetRecordsRequest(collection=collection, ids=[record_id]), timeout=10
        )
        assert list(batch.missing_ids) == [record_id]


async def test_a_record_write_on_one_tenants_process_is_never_read_old_on_the_other(two_tenants_processes):
    stack = two_tenants_processes
    assert len(stack.launched.all_pids()["tenants"]) == 2
    slug = f"rc-{uuid.uuid4().hex[:8]}"
    metadata = await provision_tenant(stack, slug)
    caller = Caller(slug, RECORD_SCOPES, "direct")
    first, second = tenants_ports(stack)
    async with (
        grpc.aio.insecure_channel(stack.gateway) as gw,
        signed_channel(first, caller) as a,
        signed_channel(second, caller) as b,
    ):
        gateway = tenants_pb2_grpc.RecordServiceStub(gw)
        one, other = tenants_pb2_grpc.RecordServiceStub(a), tenants_pb2_grpc.RecordServiceStub(b)

        async def read(stub, record_id: str, **kwargs) -> dict:
            got = await stub.GetRecord(
                tenants_pb2.GetRecordRequest(collection="c", id=record_id), timeout=10, **kwargs
            )
            return json_format.MessageToDict(got.record.data)

        await create(gateway, metadata, "c", {"v": 0}, "r1")
        # Both processes hold the record in their own cache tier before the writes start.
        assert [await read(one, "r1"), await read(other, "r1")] == [{"v": 0}] * 2
        for i in range(1, 41):
            writer, reader = (one, other) if i % 2 else (other, one)
            await writer.UpdateRecord(
                tenants_pb2.UpdateRecordRequest(
                    record=tenants_pb2.Record(collection="c", id="r1", data=struct({"v": i}))
                ),
                timeout=10,
            )
            assert await read(reader, "r1") == {"v": i}, f"update {i}: the other process answered old"
            assert await read(writer, "r1") == {"v": i}
        # Through the gateway: consecutive calls go to alternate processes.
        for i in range(41, 61):
            await gateway.UpdateRecord(
                tenants_pb2.UpdateRecordRequest(
                    record=tenants_pb2.Record(collection="c", id="r1", data=struct({"v": i}))
                ),
                metadata=metadata,
                timeout=10,
            )
            seen = [await read(gateway, "r1", metadata=metadata) for _ in range(4)]
            assert seen == [{"v": i}] * 4, f"update {i} through the gateway"
        assert [await read(one, "r1"), await read(other, "r1")] == [{"v": 60}] * 2
        await one.DeleteRecord(tenants_pb2.DeleteRecordRequest(collection="c", id="r1"), timeout=10)
        await expect_missing([other, one], "c", "r1")
        # And a delete through the gateway, read back through it and both processes.
        await create(gateway, metadata, "c", {"v": "again"}, "r2")
        assert [await read(one, "r2"), await read(other, "r2")] == [{"v": "again"}] * 2
        await gateway.DeleteRecord(
            tenants_pb2.DeleteRecordRequest(collection="c", id="r2"), metadata=metadata, timeout=10
        )
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read(gateway, "r2", metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        await expect_missing([one, other], "c", "r2")


async def test_a_tenant_delete_on_one_process_drops_its_records_from_the_others_cache(two_tenants_processes):
    stack = two_tenants_processes
    slug = f"rd-{uuid.uuid4().hex[:8]}"
    metadata = await provision_tenant(stack, slug)
    caller = Caller(slug, RECORD_SCOPES, "direct")
    admin = bearer(stack.api_key)
    async with (
        grpc.aio.insecure_channel(stack.gateway) as gw,
        signed_channel(tenants_ports(stack)[0], caller) as a,
        signed_channel(tenants_ports(stack)[1], caller) as b,
    ):
        stubs = [tenants_pb2_grpc.RecordServiceStub(a), tenants_pb2_grpc.RecordServiceStub(b)]
        ids = [f"d{i}" for i in range(5)]
        for record_id in ids:
            await create(tenants_pb2_grpc.RecordServiceStub(gw), metadata, "c", {"id": record_id}, record_id)
        for stub in stubs:  # cached in both processes
            batch = await stub.BatchGetRecords(tenants_pb2.BatchGetRecordsRequest(collection="c", ids=ids))
            assert [r.id for r in batch.records] == ids
            for record_id in ids:
                await stub.GetRecord(tenants_pb2.GetRecordRequest(collection="c", id=record_id))
        gone = await tenants_pb2_grpc.TenantServiceStub(gw).DeleteTenant(
            tenants_pb2.DeleteTenantRequest(slug=slug, cascade=True), metadata=admin, timeout=30
        )
        assert gone.records_deleted == len(ids)
        for record_id in ids:
            await expect_missing(stubs, "c", record_id)


# -- the v1 rules for updates and ordering ------------------------------------------


async def test_a_tenant_update_without_a_mask_changes_the_fields_it_sets(gw_tenants, admin_metadata, slug):
    await gw_tenants.CreateTenant(
        tenants_pb2.CreateTenantRequest(
            tenant=tenants_pb2.Tenant(slug=slug, display_name="Old", plan="free")
        ),
        metadata=admin_metadata,
    )
    update = tenants_pb2.UpdateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, plan="pro"))
    updated = (await gw_tenants.UpdateTenant(update, metadata=admin_metadata)).tenant
    assert (updated.display_name, updated.plan) == ("Old", "pro")
    # Setting nothing, and naming nothing, is no update at all.
    nothing = tenants_pb2.UpdateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug))
    assert_invalid(await rpc_error(gw_tenants.UpdateTenant(nothing, metadata=admin_metadata)), "update_mask")
    stale = tenants_pb2.UpdateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, plan="x", etag="v1"))
    error = await rpc_error(gw_tenants.UpdateTenant(stale, metadata=admin_metadata))
    assert (error.code(), error_info(error).reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    got = await gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    assert (got.tenant.plan, got.tenant.etag) == ("pro", updated.etag)


async def test_a_record_update_without_a_mask_or_data_changes_nothing(gw_records, writer):
    record = tenants_pb2.Record(collection="nomask", id="r", data=struct({"a": 1}))
    made = (
        await gw_records.CreateRecord(tenants_pb2.CreateRecordRequest(record=record), metadata=writer)
    ).record
    bare = tenants_pb2.UpdateRecordRequest(record=tenants_pb2.Record(collection="nomask", id="r"))
    assert_invalid(await rpc_error(gw_records.UpdateRecord(bare, metadata=writer)), "update_mask")
    got = await gw_records.GetRecord(
        tenants_pb2.GetRecordRequest(collection="nomask", id="r"), metadata=writer
    )
    assert got.record.etag == made.etag and json_format.MessageToDict(got.record.data) == {"a": 1}


async def test_order_by_takes_a_direction_as_aip_132_writes_it(gw_records, writer):
    for i in range(3):
        record = tenants_pb2.Record(collection="dir", id=f"r{i}", data=struct({"i": i}))
        await gw_records.CreateRecord(tenants_pb2.CreateRecordRequest(record=record), metadata=writer)

    async def ids(order_by: str) -> list[str]:
        listed = await gw_records.ListRecords(
            tenants_pb2.ListRecordsRequest(collection="dir", order_by=order_by), metadata=writer
        )
        return [r.id for r in listed.records]

    assert await ids("id") == await ids("id asc") == ["r0", "r1", "r2"]
    assert await ids("id desc") == await ids("  id   DESC ") == ["r2", "r1", "r0"]
    assert await ids("data.i desc") == ["r2", "r1", "r0"]
    for bad in ("id sideways", "id desc asc", "colour"):
        request = tenants_pb2.ListRecordsRequest(collection="dir", order_by=bad)
        assert_invalid(await rpc_error(gw_records.ListRecords(request, metadata=writer)), "order_by")

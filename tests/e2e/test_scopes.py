"""A tenant's admin manages its own tenant; the deployment belongs to operators.

Through the session's gateway: tenants acme-… and globex-… each with an admin
key, and the stack's dev key (operator).
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2

from tests.support.calls import bearer
from tests.support.errors import error_info


@pytest.fixture
async def tenants(make_key):
    """(acme slug, acme admin key, globex slug, globex key id, globex data key)."""
    run = uuid.uuid4().hex[:6]
    acme, globex = f"acme-{run}", f"globex-{run}"
    acme_admin, _ = await make_key(acme, "admin")
    globex_key, globex_key_id = await make_key(globex, "kv:read", "kv:write")
    return acme, bearer(acme_admin), globex, globex_key_id, bearer(globex_key)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_tenants_admin_manages_its_own_keys_and_no_other_tenants(gw_admin, gw_kv, tenants):
    acme, acme_admin, globex, globex_key_id, globex_data = tenants

    # Its own tenant: make, list, revoke.
    made = await gw_admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=acme, name="reader", scopes=["kv:read"]), metadata=acme_admin
    )
    listed = await gw_admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=acme_admin)
    assert {key.tenant for key in listed.keys} == {acme}
    assert made.key.key_id in {key.key_id for key in listed.keys}
    await gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=made.key.key_id), metadata=acme_admin)

    # Another tenant's: refused, and its key is untouched.
    for call in (
        gw_admin.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant=globex), metadata=acme_admin),
        gw_admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=globex, name="mine now", scopes=["kv:read"]),
            metadata=acme_admin,
        ),
    ):
        error = await refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == "OTHER_TENANT"
    error = await refused(
        gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=globex_key_id), metadata=acme_admin)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND  # as if it did not exist
    await gw_kv.Put(kv_pb2.PutRequest(namespace="n", key="k", value=b"v"), metadata=globex_data)

    # Nor may it make a key with more than a tenant's admin holds.
    error = await refused(
        gw_admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=acme, name="escalate", scopes=["operator"]),
            metadata=acme_admin,
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).metadata["scope"] == "operator"


async def test_a_tenants_admin_reads_and_writes_its_own_data(gw_kv, tenants):
    _, acme_admin, _, _, _ = tenants
    await gw_kv.Put(kv_pb2.PutRequest(namespace="n", key="k", value=b"acme"), metadata=acme_admin)
    got = await gw_kv.Get(kv_pb2.GetRequest(namespace="n", key="k"), metadata=acme_admin)
    assert got.kv.value == b"acme"


async def test_a_tenants_admin_cannot_operate_the_deployment(gw_admin, gw_tenants, tenants):
    acme, acme_admin, globex, _, _ = tenants
    calls = {
        "CreateTenant": gw_tenants.CreateTenant(
            tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=f"{acme}-x")), metadata=acme_admin
        ),
        "DeleteTenant": gw_tenants.DeleteTenant(
            tenants_pb2.DeleteTenantRequest(slug=globex, cascade=True), metadata=acme_admin
        ),
        "ListTenants": gw_tenants.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=acme_admin),
        "DeclareIndex": gw_tenants.DeclareIndex(
            tenants_pb2.DeclareIndexRequest(index=tenants_pb2.RecordIndex(collection="c", path="a")),
            metadata=acme_admin,
        ),
        "GetSystemHealth": gw_admin.GetSystemHealth(admin_pb2.GetSystemHealthRequest(), metadata=acme_admin),
        "InvalidateCache": gw_admin.InvalidateCache(admin_pb2.InvalidateCacheRequest(), metadata=acme_admin),
        "CreateBranch": gw_admin.CreateBranch(
            admin_pb2.CreateBranchRequest(name="stolen"), metadata=acme_admin
        ),
        "ApplyMigrations": gw_admin.ApplyMigrations(admin_pb2.ApplyMigrationsRequest(), metadata=acme_admin),
    }
    for name, call in calls.items():
        error = await refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert error_info(error).metadata["scope"] == "operator", name
    backup = gw_admin.Backup(admin_pb2.BackupRequest(), metadata=acme_admin)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await backup.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_tenants_admin_sees_only_its_own_tenants_audit_events(gw_admin, admin_metadata, tenants):
    acme, acme_admin, globex, _, _ = tenants
    await gw_admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=acme, name="audited", scopes=["kv:read"]), metadata=acme_admin
    )
    # The operator acts on globex meanwhile.
    await gw_admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=globex, name="by the operator", scopes=["kv:read"]),
        metadata=admin_metadata,
    )
    seen = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(page_size=1000), metadata=acme_admin
    )
    assert seen.events
    assert {event.actor_tenant for event in seen.events} == {acme}
    everything = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(page_size=1000), metadata=admin_metadata
    )
    assert len({event.actor_tenant for event in everything.events}) > 1

"""A session-wide Strata (launcher, services, gateway as processes) exporting traces to a test receiver."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from strata.vector.v1 import vector_pb2_grpc

from tests.support.calls import AdminStubs, bearer
from tests.support.otlp import TraceReceiver, start_receiver
from tests.support.stack import Stack, remove_data, start_stack


@pytest.fixture(scope="session")
async def receiver() -> AsyncIterator[TraceReceiver]:
    server, receiver = await start_receiver()
    yield receiver
    await server.stop(None)


@pytest.fixture(scope="session")
async def stack(settings, receiver) -> AsyncIterator[Stack]:
    """The launcher in external mode against the test backends; every process traced."""
    running = await start_stack(settings, receiver.port)
    yield running
    await running.stop()
    remove_data(running)


@pytest.fixture(scope="session")
async def gateway_channel(stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        yield channel


@pytest.fixture(scope="session")
def admin_metadata(stack) -> tuple[tuple[str, str], ...]:
    """Metadata carrying the stack's dev (admin) key."""
    return bearer(stack.api_key)


@pytest.fixture(scope="session")
def gw_kv(gateway_channel) -> kv_pb2_grpc.KvServiceStub:
    return kv_pb2_grpc.KvServiceStub(gateway_channel)


@pytest.fixture(scope="session")
def gw_admin(gateway_channel) -> AdminStubs:
    return AdminStubs(gateway_channel)


@pytest.fixture(scope="session")
def gw_tenants(gateway_channel) -> tenants_pb2_grpc.TenantServiceStub:
    return tenants_pb2_grpc.TenantServiceStub(gateway_channel)


@pytest.fixture(scope="session")
def gw_records(gateway_channel) -> tenants_pb2_grpc.RecordServiceStub:
    return tenants_pb2_grpc.RecordServiceStub(gateway_channel)


@pytest.fixture
def make_key(gw_admin, gw_tenants, admin_metadata):
    """Create an API key (registering its tenant if needed) through the gateway; (api_key, key_id)."""

    async def make(tenant: str, *scopes: str) -> tuple[str, str]:
        try:
            await gw_tenants.CreateTenant(
                tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=tenant)),
                metadata=admin_metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        made = await gw_admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=tenant, name=f"test {tenant}", scopes=list(scopes)),
            metadata=admin_metadata,
        )
        return made.api_key, made.key.key_id

    return make


@pytest.fixture(scope="session")
def gw_vector(gateway_channel) -> vector_pb2_grpc.VectorServiceStub:
    return vector_pb2_grpc.VectorServiceStub(gateway_channel)


@pytest.fixture
def slug() -> str:
    """A fresh tenant slug."""
    return f"v-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def md(make_key, slug) -> tuple[tuple[str, str], ...]:
    """Metadata of a key with vector:read and vector:write for a fresh tenant (``slug``)."""
    api_key, _ = await make_key(slug, "vector:read", "vector:write")
    return bearer(api_key)

"""What the gateway serves: every Strata method, the service that owns it, and the scope it needs.

Built from the generated descriptors, so a new RPC in a proto is routed
without touching the gateway; only its scope rule lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2
from strata.vector.v1 import vector_pb2

from shared.api.callers import ADMIN_SCOPE, INTERNAL_SCOPE, OPERATOR_SCOPE

__all__ = ["ROUTED_SERVICES", "Route", "build_routes"]

# Upstream name (its STRATA_<NAME>_UPSTREAMS / port setting) → the services it serves.
ROUTED_SERVICES: dict[str, tuple[descriptor.ServiceDescriptor, ...]] = {
    "kv": (kv_pb2.DESCRIPTOR.services_by_name["KvService"],),
    "tenants": (
        tenants_pb2.DESCRIPTOR.services_by_name["TenantService"],
        tenants_pb2.DESCRIPTOR.services_by_name["RecordService"],
    ),
    "vector": (vector_pb2.DESCRIPTOR.services_by_name["VectorService"],),
    "admin": (admin_pb2.DESCRIPTOR.services_by_name["AdminService"],),
}

# Methods that only read; every other method of a data service writes.
_READS = frozenset(
    {
        "Get",
        "BatchGet",
        "List",
        "Watch",
        "GetRecord",
        "BatchGetRecords",
        "ListRecords",
        "GetCollection",
        "ListCollections",
        "GetPoints",
        "CountPoints",
        "ScrollPoints",
        "Search",
        "SearchBatch",
        "HybridSearch",
    }
)
# Services of the deployment: every method needs the operator scope, but for those below.
_OPERATOR_SERVICES = frozenset({"strata.admin.v1.AdminService", "strata.tenants.v1.TenantService"})
# What a tenant's admin may do, for its own tenant only (the service enforces which tenant).
_TENANT_ADMIN = frozenset(
    {
        "/strata.admin.v1.AdminService/CreateApiKey",
        "/strata.admin.v1.AdminService/ListApiKeys",
        "/strata.admin.v1.AdminService/RevokeApiKey",
        "/strata.admin.v1.AdminService/ListAuditEvents",
    }
)
# Methods no API key may call through the gateway.
_INTERNAL = frozenset(
    {"/strata.admin.v1.AdminService/AuthenticateApiKey", "/strata.kv.v1.KvService/PurgeTenant"}
)


@dataclass(frozen=True, slots=True)
class Route:
    """One method: where it goes and what the caller needs."""

    path: str  # "/strata.kv.v1.KvService/Get"
    service: str  # "strata.kv.v1.KvService"
    method: str  # "Get"
    upstream: str  # "kv"
    scope: str  # "kv:read"
    server_streaming: bool
    client_streaming: bool = False


def _scope(upstream: str, service: str, path: str, method: str) -> str:
    if path in _INTERNAL:
        return INTERNAL_SCOPE
    if path in _TENANT_ADMIN:
        return ADMIN_SCOPE
    if service in _OPERATOR_SERVICES:
        return OPERATOR_SCOPE
    return f"{upstream}:{'read' if method in _READS else 'write'}"


def build_routes() -> dict[str, Route]:
    """Path → route for every method of every routed service."""
    routes: dict[str, Route] = {}
    for upstream, services in ROUTED_SERVICES.items():
        for service in services:
            for method in service.methods:
                if method.client_streaming and method.server_streaming:
                    raise NotImplementedError(f"bidirectional streaming is not routed: {method.full_name}")
                path = f"/{service.full_name}/{method.name}"
                routes[path] = Route(
                    path,
                    service.full_name,
                    method.name,
                    upstream,
                    _scope(upstream, service.full_name, path, method.name),
                    method.server_streaming,
                    method.client_streaming,
                )
    return routes

"""What the gateway serves: every public Strata method, the upstream that owns it, and its scope.

Built from the generated descriptors: a new RPC in a proto is routed without
touching the gateway, and its scope is the one the proto declares
(``strata.common.v1.required_scope``, read by :mod:`shared.rpc.contract`, as
every service's bootstrap reads it too). The internal services
(``strata.internal.v1``) are not routed at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2
from strata.vector.v1 import vector_pb2

from shared.api.callers import INTERNAL_SCOPE
from shared.rpc.contract import error_domain, required_scope

__all__ = ["ROUTED_SERVICES", "Route", "build_routes"]

# Upstream name (its STRATA_<NAME>_UPSTREAMS / port setting) → the public services it serves.
ROUTED_SERVICES: dict[str, tuple[descriptor.ServiceDescriptor, ...]] = {
    "kv": (kv_pb2.DESCRIPTOR.services_by_name["KvService"],),
    "tenants": (
        tenants_pb2.DESCRIPTOR.services_by_name["TenantService"],
        tenants_pb2.DESCRIPTOR.services_by_name["RecordService"],
    ),
    "vector": (vector_pb2.DESCRIPTOR.services_by_name["VectorService"],),
    "admin": tuple(
        admin_pb2.DESCRIPTOR.services_by_name[name]
        for name in ("ApiKeyService", "OperationsService", "BackupService", "AuditService")
    ),
}


@dataclass(frozen=True, slots=True)
class Route:
    """One method: where it goes and what the caller needs."""

    path: str  # "/strata.kv.v1.KvService/Get"
    service: str  # "strata.kv.v1.KvService"
    method: str  # "Get"
    upstream: str  # "kv"
    scope: str  # "kv:read"
    domain: str  # "strata.kv.v1": the ErrorInfo domain of the gateway's own refusals
    server_streaming: bool
    client_streaming: bool = False


def build_routes() -> dict[str, Route]:
    """Path → route for every method of every routed service."""
    routes: dict[str, Route] = {}
    for upstream, services in ROUTED_SERVICES.items():
        for service in services:
            for method in service.methods:
                if method.client_streaming and method.server_streaming:
                    raise NotImplementedError(f"bidirectional streaming is not routed: {method.full_name}")
                scope = required_scope(method)
                if scope == INTERNAL_SCOPE:
                    raise TypeError(f"{method.full_name} is internal: it belongs to strata.internal.v1")
                path = f"/{service.full_name}/{method.name}"
                routes[path] = Route(
                    path,
                    service.full_name,
                    method.name,
                    upstream,
                    scope,
                    error_domain(service),
                    method.server_streaming,
                    method.client_streaming,
                )
    return routes

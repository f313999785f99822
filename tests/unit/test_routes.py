"""The gateway's route table: every method routed, with the scope it needs."""

from __future__ import annotations

from strata.internal.v1 import internal_pb2

from gateway.routes import ROUTED_SERVICES, build_routes
from shared.rpc.contract import required_scope

ROUTES = build_routes()


def test_every_method_of_every_routed_service_has_a_route():
    expected = {
        f"/{service.full_name}/{method.name}"
        for services in ROUTED_SERVICES.values()
        for service in services
        for method in service.methods
    }
    assert set(ROUTES) == expected


def test_kv_reads_and_writes_need_their_scopes():
    scopes = {
        path.rsplit("/", 1)[1]: r.scope for path, r in ROUTES.items() if r.service == "strata.kv.v1.KvService"
    }
    assert {m for m, s in scopes.items() if s == "kv:read"} == {"Get", "BatchGet", "List", "Watch"}
    assert {m for m, s in scopes.items() if s == "kv:write"} == {"Put", "BatchPut", "Delete"}


def test_records_reads_and_writes_need_their_scopes():
    scopes = {r.method: r.scope for r in ROUTES.values() if r.service == "strata.tenants.v1.RecordService"}
    assert {m for m, s in scopes.items() if s == "tenants:read"} == {
        "GetRecord",
        "BatchGetRecords",
        "ListRecords",
    }
    assert {m for m, s in scopes.items() if s == "tenants:write"} == {
        "CreateRecord",
        "UpdateRecord",
        "DeleteRecord",
    }


TENANT_ADMIN_SERVICES = {"strata.admin.v1.ApiKeyService", "strata.admin.v1.AuditService"}
OPERATOR_SERVICES = {
    "strata.admin.v1.OperationsService",
    "strata.admin.v1.BackupService",
    "strata.tenants.v1.TenantService",
}


def test_operator_services_need_operator_but_a_tenants_own_keys_and_audit_need_admin():
    for route in ROUTES.values():
        if route.service in TENANT_ADMIN_SERVICES:
            assert route.scope == "admin", route
        elif route.service in OPERATOR_SERVICES:
            assert route.scope == "operator", route
        else:
            assert route.scope.split(":")[0] == route.upstream, route


def test_no_internal_method_is_routed_and_every_one_needs_the_internal_scope():
    internal = internal_pb2.DESCRIPTOR.services_by_name.values()
    methods = [method for service in internal for method in service.methods]
    assert {m.name for m in methods} == {"AuthenticateApiKey", "PurgeTenant"}
    assert all(required_scope(m) == "internal" for m in methods)
    assert not {r.service for r in ROUTES.values()} & {s.full_name for s in internal}
    assert "internal" not in {r.scope for r in ROUTES.values()}


def test_a_refusal_names_the_called_services_package_as_its_domain():
    assert {r.domain for r in ROUTES.values()} == {
        "strata.kv.v1",
        "strata.tenants.v1",
        "strata.vector.v1",
        "strata.admin.v1",
    }
    assert all(r.service.startswith(r.domain + ".") for r in ROUTES.values())


def test_vector_reads_and_writes_need_their_scopes():
    scopes = {r.method: r.scope for r in ROUTES.values() if r.service == "strata.vector.v1.VectorService"}
    writes = {"CreateCollection", "DeleteCollection", "RebuildIndex", "UpsertPoints", "DeletePoints"}
    assert {m for m, s in scopes.items() if s == "vector:write"} == writes
    assert all(s == "vector:read" for m, s in scopes.items() if m not in writes)


def test_streaming_routes_are_watch_backup_and_restore():
    assert {r.method for r in ROUTES.values() if r.server_streaming} == {"Watch", "Backup"}
    assert [r.method for r in ROUTES.values() if r.client_streaming] == ["Restore"]


def test_each_route_goes_to_the_upstream_that_serves_it():
    for route in ROUTES.values():
        services = {s.full_name for s in ROUTED_SERVICES[route.upstream]}
        assert route.service in services

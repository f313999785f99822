"""Wires the tenants process: TenantService and RecordService on one server."""

from __future__ import annotations

from strata.tenants.v1 import tenants_pb2

from services.tenants.records.servicer import RecordServicer
from services.tenants.records.store import RecordStore
from services.tenants.registry.purge import TenantPurge
from services.tenants.registry.servicer import TenantServicer
from services.tenants.registry.store import TenantStore
from shared.api.pagetoken import PageTokens
from shared.cache.revisioned import RevisionedCache
from shared.config.settings import Settings, require_internal_secret
from shared.rpc.server import StrataServer, run_service
from shared.storage.service_db import open_service_database

__all__ = ["build_tenants_server", "main"]

TENANT_SERVICE = tenants_pb2.DESCRIPTOR.services_by_name["TenantService"]
RECORD_SERVICE = tenants_pb2.DESCRIPTOR.services_by_name["RecordService"]


async def build_tenants_server(settings: Settings) -> StrataServer:
    """A ready-to-start tenants server on ``settings``' database."""
    db = await open_service_database(settings, "tenants")
    cache = RevisionedCache.for_service(settings, "records")
    purge = TenantPurge(cache, settings)
    tokens = PageTokens(require_internal_secret(settings))
    server = StrataServer(settings, "tenants")
    server.report("pool", db.pool_stats)
    server.report("cache", cache.snapshot)
    server.add_servicer(
        TenantServicer(TenantStore(db), purge, tokens, settings.max_message_bytes), TENANT_SERVICE
    )
    server.add_servicer(
        RecordServicer(RecordStore(db), cache, tokens, settings.max_message_bytes), RECORD_SERVICE
    )
    server.after_drain(purge.close)
    server.after_drain(cache.close)
    server.after_drain(db.close)
    return server


def main() -> None:
    """Entry point of the tenants process."""
    run_service("tenants", build_tenants_server)

"""Wires the admin service into the shared server bootstrap."""

from __future__ import annotations

from strata.admin.v1 import admin_pb2

from services.admin.archives import ArchiveSigner
from services.admin.audit_log import AuditLog
from services.admin.backups import Backups
from services.admin.keys import ApiKeyStore
from services.admin.operations import Operations
from services.admin.pitr import PointInTime
from services.admin.servicer import AdminServicer
from shared.pagetoken import PageTokens
from shared.redisclient import open_redis
from shared.server import StrataServer, run_service
from shared.service_db import open_service_database
from shared.settings import ConfigError, Settings, require_internal_secret

__all__ = ["build_admin_server", "main"]

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


async def build_admin_server(settings: Settings) -> StrataServer:
    """A ready-to-start admin server on ``settings``' database."""
    if len(settings.key_pepper) < 16:
        raise ConfigError("STRATA_KEY_PEPPER must be set (16+ characters); API key hashes depend on it")
    db = await open_service_database(settings, "admin")
    server = StrataServer(settings, "admin")
    server.report("pool", db.pool_stats)
    operations = Operations.for_settings(settings, db, open_redis(settings.redis_url))
    server.after_drain(operations.close)
    pitr = PointInTime.for_settings(settings, db)
    pitr.start()
    server.after_drain(pitr.close)  # stops the point-in-time branches' servers
    signer = ArchiveSigner(require_internal_secret(settings))
    backups = Backups(db, settings.migrate_database_url, settings.restore_max_bytes, signer, pitr)
    tokens = PageTokens(require_internal_secret(settings))
    keys = ApiKeyStore(db)
    servicer = AdminServicer(
        keys, settings.key_pepper.encode(), operations, backups, AuditLog(db, tokens), tokens
    )
    server.add_servicer(servicer, SERVICE)
    server.after_drain(db.close)
    return server


def main() -> None:
    """Entry point of the admin process."""
    run_service("admin", build_admin_server)

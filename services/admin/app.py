"""Wires the admin service into the shared server bootstrap.

Admin serves four public services, one a concern, each a package with its
servicer and store: ApiKeyService (:mod:`.keys`), OperationsService
(:mod:`.operations`), BackupService (:mod:`.branches`) and AuditService
(:mod:`.audit`); and the internal ApiKeyAuthService, which the gateway asks.
"""

from __future__ import annotations

from strata.admin.v1 import admin_pb2
from strata.internal.v1 import internal_pb2

from services.admin.audit.servicer import AuditServicer
from services.admin.audit.store import AuditStore
from services.admin.branches.archives import ArchiveSigner
from services.admin.branches.backups import Backups, PointInTimeBranches
from services.admin.branches.servicer import BranchServicer
from services.admin.branches.unmanaged import NoPointInTime
from services.admin.keys.authenticator import ApiKeyAuthServicer
from services.admin.keys.servicer import ApiKeyServicer
from services.admin.keys.store import ApiKeyStore
from services.admin.operations import Operations
from services.admin.operations.servicer import OperationsServicer
from shared.api.pagetoken import PageTokens
from shared.cache.redisclient import open_redis
from shared.config.settings import ConfigError, Settings, require_internal_secret
from shared.rpc.server import StrataServer, run_service
from shared.storage.service_db import open_service_database

__all__ = ["build_admin_server", "main"]

SERVICES = admin_pb2.DESCRIPTOR.services_by_name
AUTH_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["ApiKeyAuthService"]


async def build_admin_server(settings: Settings) -> StrataServer:
    """A ready-to-start admin server on ``settings``' database."""
    if len(settings.key_pepper) < 16:
        raise ConfigError("STRATA_KEY_PEPPER must be set (16+ characters); API key hashes depend on it")
    db = await open_service_database(settings, "admin")
    server = StrataServer(settings, "admin")
    server.report("pool", db.pool_stats)
    operations = Operations.for_settings(settings, db, open_redis(settings.redis_url))
    server.after_drain(operations.close)
    pitr: PointInTimeBranches = NoPointInTime()
    if settings.pitr_dir:
        # Embedded mode only: the point-in-time servers are the dev stack's (never a deployment's).
        from services.admin.branches.pitr import PointInTime

        managed = PointInTime.for_settings(settings, db)
        managed.start()
        server.after_drain(managed.close)  # stops the point-in-time branches' servers
        pitr = managed
    signer = ArchiveSigner(require_internal_secret(settings))
    backups = Backups(db, settings.migrate_database_url, settings.restore_max_bytes, signer, pitr)
    tokens = PageTokens(require_internal_secret(settings))
    keys = ApiKeyStore(db)
    server.add_servicer(ApiKeyServicer(keys, settings.key_pepper.encode(), tokens), SERVICES["ApiKeyService"])
    server.add_servicer(ApiKeyAuthServicer(keys, settings.key_pepper.encode()), AUTH_SERVICE)
    server.add_servicer(OperationsServicer(operations), SERVICES["OperationsService"])
    server.add_servicer(BranchServicer(backups), SERVICES["BackupService"])
    server.add_servicer(AuditServicer(AuditStore(db), tokens), SERVICES["AuditService"])
    server.after_drain(db.close)
    return server


def main() -> None:
    """Entry point of the admin process."""
    run_service("admin", build_admin_server)

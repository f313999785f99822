"""GetMigrationStatus and ApplyMigrations: this build's migrations against what the database applied."""

from __future__ import annotations

import asyncpg
from strata.admin.v1 import admin_pb2

from shared.api.errors import Code, StrataError
from shared.api.timestamps import to_timestamp
from shared.config.settings import Settings
from shared.storage.audit import record_audit
from shared.storage.db import Database
from shared.storage.migrations import SCHEMAS, Migration, MigrationError, apply_migrations
from shared.storage.migrations import status as migration_versions

__all__ = ["MigrationControl"]


class MigrationControl:
    """This build's migration plan, and the database's record of what it applied."""

    def __init__(self, settings: Settings, db: Database, plan: list[Migration]) -> None:
        self._settings = settings
        self._db = db
        self._plan = plan

    async def migration_status(self, timeout: float) -> admin_pb2.GetMigrationStatusResponse:
        """Applied and pending migrations per schema."""
        rows = await self._applied_migrations(timeout)
        done = {(r["schema_name"], r["version"]) for r in rows}
        applied: dict[str, int] = {}
        for schema, version in done:
            applied[schema] = max(applied.get(schema, 0), version)
        response = admin_pb2.GetMigrationStatusResponse(schemas=self.schema_versions(applied))
        for row in rows:
            response.applied.add(
                schema=row["schema_name"],
                version=row["version"],
                name=row["name"],
                checksum=row["checksum"],
                apply_time=to_timestamp(row["applied_at"]),
            )
        response.pending.extend(_migration_record(m) for m in self._plan if (m.schema, m.version) not in done)
        return response

    async def apply_migrations(self, timeout: float) -> admin_pb2.ApplyMigrationsResponse:
        """Apply what is pending as the owner role, under the start-up lock; audited."""
        owner_url = self._settings.migrate_database_url
        if not owner_url:
            raise StrataError(
                Code.FAILED_PRECONDITION,
                "OWNER_ROLE_NOT_CONFIGURED",
                "STRATA_MIGRATE_DATABASE_URL is not set for the admin service",
            )
        conn = await asyncpg.connect(owner_url, timeout=min(timeout, 10.0))
        try:
            applied = await apply_migrations(conn, self._plan)
        except MigrationError as exc:
            raise StrataError(Code.FAILED_PRECONDITION, "MIGRATION_HISTORY_CONFLICT", str(exc)) from exc
        finally:
            await conn.close()
        async with self._db.transaction(timeout=timeout) as audit_conn:
            await record_audit(
                audit_conn,
                "migrations",
                {"applied": [f"{m.schema}/{m.version:04d}_{m.name}" for m in applied]},
                timeout=timeout,
            )
        return admin_pb2.ApplyMigrationsResponse(applied=[_migration_record(m) for m in applied])

    async def applied_versions(self, timeout: float) -> dict[str, int]:
        """The highest applied migration per schema (the start-up runner's own reading)."""
        async with self._db.transaction(timeout=timeout) as conn:
            return await migration_versions(conn)

    async def _applied_migrations(self, timeout: float) -> list[asyncpg.Record]:
        """Every applied migration, by schema and number (none before the first run)."""
        exists = await self._db.fetchval(
            "SELECT to_regclass('public.strata_migrations') IS NOT NULL", timeout=timeout
        )
        if not exists:
            return []
        return await self._db.fetch(
            "SELECT schema_name, version, name, checksum, applied_at FROM public.strata_migrations "
            "ORDER BY schema_name, version",
            timeout=timeout,
        )

    def schema_versions(self, applied: dict[str, int]) -> list[admin_pb2.SchemaVersion]:
        """Each schema's applied version (from ``applied``) beside this build's latest."""
        latest: dict[str, int] = {}
        for migration in self._plan:
            latest[migration.schema] = max(latest.get(migration.schema, 0), migration.version)
        return [
            admin_pb2.SchemaVersion(
                schema=schema, applied_version=applied.get(schema, 0), latest_version=latest.get(schema, 0)
            )
            for schema in SCHEMAS
        ]


def _migration_record(migration: Migration) -> admin_pb2.MigrationRecord:
    return admin_pb2.MigrationRecord(
        schema=migration.schema, version=migration.version, name=migration.name, checksum=migration.checksum
    )

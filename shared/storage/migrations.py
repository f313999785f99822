"""The one migration runner: numbered SQL files per service schema.

Each service keeps ``migrations/NNNN_name.sql`` beside its code and owns one
schema. :func:`apply_migrations` applies the files not yet recorded, in order,
each in its own transaction, under a Postgres advisory lock so concurrent
starters do not race; applying twice is a no-op. A recorded file whose
content changed is refused (checksum), since the database no longer matches
what the file says.

Migrations run as an owner role; services connect as ``strata_app`` members,
which own nothing and cannot bypass row-level security. The runner creates
the ``strata_app`` group role when it is missing so files can grant to it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import asyncpg

__all__ = [
    "APP_ROLE",
    "SCHEMAS",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "discover",
    "ensure_service_role",
    "migrate",
    "migration_plan",
    "status",
]

APP_ROLE = "strata_app"
# Every service's schema, in the order they migrate (a later one may refer to an earlier one's).
SCHEMAS = ("kv", "tenants", "vector", "admin")
# services/<schema>/migrations, read as files (shared/ imports no service).
_SERVICES_ROOT = Path(__file__).resolve().parents[2] / "services"
_LOCK_KEY = 0x5354524154410001  # "STRATA" + 1: one lock for every schema
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration folder or the recorded history is inconsistent."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: ``schema``, ``version`` (its number), ``name`` and content."""

    schema: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(schema: str, folder: Path) -> list[Migration]:
    """The migrations in ``folder`` for ``schema``, ordered by number."""
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(schema, int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"{folder}: migration numbers must run 1, 2, 3 … without gaps: {versions}")
    return found


async def apply_migrations(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply what is pending of ``migrations`` on ``conn``; return what was applied."""
    applied: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await _ensure_bookkeeping(conn)
        done = await _recorded(conn)
        for migration in migrations:
            key = (migration.schema, migration.version)
            if key in done:
                if done[key] != migration.checksum:
                    raise MigrationError(
                        f"{migration.schema} migration {migration.version:04d}_{migration.name} "
                        "was changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO public.strata_migrations (schema_name, version, name, checksum) "
                    "VALUES ($1, $2, $3, $4)",
                    migration.schema,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            _log.info("migration applied", extra={"schema": migration.schema, "version": migration.version})
            applied.append(migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


def migration_plan(schemas: tuple[str, ...] = SCHEMAS) -> list[Migration]:
    """Every migration of ``schemas``, in order; a name without a migrations folder has none."""
    plan: list[Migration] = []
    for schema in schemas:
        folder = _SERVICES_ROOT / schema / "migrations"
        if folder.is_dir():
            plan.extend(discover(schema, folder))
    return plan


async def migrate(owner_url: str, service_url: str, schemas: tuple[str, ...] = SCHEMAS) -> list[Migration]:
    """Connect as the owner role, make the service role of ``service_url`` (when it is another role)
    and apply every pending migration of ``schemas``; the migrations applied."""
    conn = await asyncpg.connect(owner_url)
    try:
        if owner_url != service_url:
            await ensure_service_role(conn, service_url)
        return await apply_migrations(conn, migration_plan(schemas))
    finally:
        await conn.close()


async def status(conn: asyncpg.Connection) -> dict[str, int]:
    """The highest applied version per schema (empty before the first run)."""
    exists = await conn.fetchval("SELECT to_regclass('public.strata_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch(
        "SELECT schema_name, max(version) AS version FROM public.strata_migrations GROUP BY schema_name"
    )
    return {r["schema_name"]: r["version"] for r in rows}


async def ensure_service_role(conn: asyncpg.Connection, service_url: str) -> None:
    """Make the login role of ``service_url`` a ``strata_app`` member that can connect.

    Creates the role (with the URL's password) when missing; an existing role
    keeps its attributes and gets its password from the URL when one is given.
    Refuses a superuser or BYPASSRLS role: row-level security must bind it.
    ``conn`` is an owner connection on the Strata database.
    """
    parsed = urlparse(service_url)
    user = unquote(parsed.username or "")
    if not user:
        raise MigrationError("DATABASE_URL names no user")
    password = unquote(parsed.password) if parsed.password else None
    quoted = await conn.fetchval("SELECT quote_ident($1)", user)
    await _ensure_app_role(conn)
    role = await conn.fetchrow("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", user)
    if role is None:
        await conn.execute(f"CREATE ROLE {quoted} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS")
    elif role["rolsuper"] or role["rolbypassrls"]:
        raise MigrationError(f"the service role {user!r} is a superuser or bypasses RLS; use a plain role")
    if password is not None:
        # ALTER ROLE takes no bind parameters; quote the password as a literal.
        literal = await conn.fetchval("SELECT quote_literal($1)", password)
        await conn.execute(f"ALTER ROLE {quoted} PASSWORD {literal}")
    await conn.execute(f"GRANT {APP_ROLE} TO {quoted}")
    database = await conn.fetchval("SELECT quote_ident(current_database())")
    await conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {APP_ROLE}")


async def _ensure_app_role(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            CREATE ROLE {APP_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS;
          END IF;
        END $$;
        """
    )


async def _ensure_bookkeeping(conn: asyncpg.Connection) -> None:
    await _ensure_app_role(conn)
    await conn.execute(
        f"""
        CREATE TABLE IF NOT EXISTS public.strata_migrations (
          schema_name text NOT NULL,
          version integer NOT NULL,
          name text NOT NULL,
          checksum text NOT NULL,
          applied_at timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (schema_name, version)
        );
        GRANT SELECT ON public.strata_migrations TO {APP_ROLE};
        """
    )


async def _recorded(conn: asyncpg.Connection) -> dict[tuple[str, int], str]:
    rows = await conn.fetch("SELECT schema_name, version, checksum FROM public.strata_migrations")
    return {(r["schema_name"], r["version"]): r["checksum"] for r in rows}

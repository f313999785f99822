"""The owner role (``STRATA_MIGRATE_DATABASE_URL``) and what it does to databases and roles.

Every CREATE/DROP DATABASE and the tools run as this role; the password
reaches the tools in ``PGPASSWORD`` only, never on a command line.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from services.admin.branches.archives import STRATA_SCHEMAS
from services.admin.branches.names import name_taken
from shared.api.errors import Code, StrataError

__all__ = [
    "OwnerRole",
    "copy_database_settings",
    "create_database",
    "create_restore_role",
    "drop_database",
    "drop_role",
    "is_superuser",
    "live_functions",
    "quote_ident",
]

# What the tools may see of this process's environment, besides PG* and LC_* (TLS files, locale).
_TOOL_ENV = frozenset({"PATH", "HOME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"})


@dataclass(frozen=True, slots=True)
class OwnerRole:
    """The owner role's URL, split so that the password travels apart from the rest."""

    url: str = field(repr=False)  # holds the password
    database: str  # the live database
    password: str = field(repr=False)
    user: str
    _scheme: str
    _hosts: str
    _query: str  # without a password parameter

    @classmethod
    def parse(cls, url: str) -> OwnerRole:
        parts = urlsplit(url)
        userinfo, _at, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        query = parse_qsl(parts.query, keep_blank_values=True)
        password = unquote(password) or dict(query).get("password", "")
        # libpq's default database is the user's name.
        database = unquote(parts.path.lstrip("/")) or unquote(user)
        kept = urlencode([(k, v) for k, v in query if k != "password"])
        return cls(url, database, password, unquote(user), parts.scheme, hosts, kept)

    def as_role(self, user: str, password: str) -> OwnerRole:
        """The same server and database as another role (a restore's own)."""
        netloc = f"{quote(user)}:{quote(password)}@{self._hosts}"
        url = urlunsplit((self._scheme, netloc, "/" + quote(self.database), self._query, ""))
        return OwnerRole(url, self.database, password, user, self._scheme, self._hosts, self._query)

    def conninfo(self, database: str) -> str:
        """A libpq URL for ``database`` as this role, without the password (it goes in :meth:`env`)."""
        netloc = f"{quote(self.user)}@{self._hosts}" if self.user else self._hosts
        return urlunsplit((self._scheme, netloc, "/" + quote(database), self._query, ""))

    def env(self, application: str) -> dict[str, str]:
        """The tools' environment: the password, an application name, and what libpq reads of ours.

        Nothing else of this process's environment (its secrets and URLs) reaches the tools.
        """
        env = {k: v for k, v in os.environ.items() if k in _TOOL_ENV or k.startswith(("PG", "LC_"))}
        env["PGAPPNAME"] = application
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    @asynccontextmanager
    async def connect(self, database: str | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A short-lived owner connection (these calls are rare; no pool is kept)."""
        conn = await asyncpg.connect(
            self.url,
            database=database or self.database,
            timeout=10,
            server_settings={"application_name": "strata-admin-owner"},
        )
        try:
            yield conn
        finally:
            await conn.close()


async def create_database(
    conn: asyncpg.Connection, name: str, database: str, role: str | None, timeout: float
) -> None:
    owned = f" OWNER {quote_ident(role)}" if role is not None else ""
    try:
        # The name is validated ([a-z0-9_]), so quoting it is enough.
        await conn.execute(f'CREATE DATABASE "{database}"{owned}', timeout=timeout)
    except asyncpg.DuplicateDatabaseError:
        raise name_taken(name) from None
    except asyncpg.InsufficientPrivilegeError:
        raise StrataError(
            Code.FAILED_PRECONDITION,
            "OWNER_CANNOT_CREATE_DATABASE",
            "the owner role (STRATA_MIGRATE_DATABASE_URL) may not create databases; grant it CREATEDB",
        ) from None


async def drop_database(conn: asyncpg.Connection, database: str, timeout: float) -> None:
    await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', timeout=timeout)


async def create_restore_role(conn: asyncpg.Connection, restorer: OwnerRole, timeout: float) -> None:
    """The role a restore runs as: it may log in and nothing else (no superuser, no BYPASSRLS,
    member of no role, so none of pg_execute_server_program's or pg_write_server_files' rights).

    The owner role becomes its member, so that it may make it a database's owner.
    """
    role = quote_ident(restorer.user)
    await drop_role(conn, restorer.user, timeout)  # a role left by a process killed mid-restore
    # The password is hex (secrets.token_hex): safe inside a literal.
    await conn.execute(
        f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION "
        f"NOBYPASSRLS CONNECTION LIMIT 2 PASSWORD '{restorer.password}'",
        timeout=timeout,
    )
    if not await is_superuser(conn):
        await conn.execute(f"GRANT {role} TO CURRENT_USER", timeout=timeout)


async def drop_role(conn: asyncpg.Connection, role: str, timeout: float) -> None:
    """Drop a restore's role (after its database); nothing else of the cluster is its."""
    await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}", timeout=timeout)


async def live_functions(owner: OwnerRole, timeout: float) -> set[tuple[str, str]]:
    """(schema, name) of every function the live database has in Strata's schemas."""
    async with owner.connect() as conn:
        rows = await conn.fetch(
            "SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = ANY($1::text[])",
            sorted(STRATA_SCHEMAS),
            timeout=timeout,
        )
    return {(row[0], row[1]) for row in rows}


async def copy_database_settings(conn: asyncpg.Connection, owner: OwnerRole, database: str) -> None:
    """Give ``database`` what pg_dump does not carry: the live database's privileges and LEAKPROOF marks.

    Privileges let the same service role connect; the marks (set by the
    tenants migrations, superuser only) let declared indexes serve filters
    under row-level security in the copy as they do in the original.
    """
    # A NULL ACL means the defaults, which the new database has already.
    if await conn.fetchval("SELECT datacl IS NOT NULL FROM pg_database WHERE datname = current_database()"):
        await conn.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
        grants = await conn.fetch(
            "SELECT a.grantee = 0 AS public, r.rolname, a.privilege_type, a.is_grantable "
            "FROM pg_database d CROSS JOIN LATERAL aclexplode(d.datacl) a "
            "LEFT JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE d.datname = current_database() AND a.grantee <> d.datdba"  # the owner's are implicit
        )
        for grant in grants:
            grantee = "PUBLIC" if grant["public"] else quote_ident(grant["rolname"])
            option = " WITH GRANT OPTION" if grant["is_grantable"] else ""
            await conn.execute(
                f'GRANT {grant["privilege_type"]} ON DATABASE "{database}" TO {grantee}{option}'
            )
    if not await is_superuser(conn):
        return
    leakproof = (
        "SELECT oid::regprocedure::text FROM pg_proc "
        "WHERE proleakproof AND pronamespace = 'pg_catalog'::regnamespace"
    )
    wanted = {r[0] for r in await conn.fetch(leakproof)}
    async with owner.connect(database) as copy:
        for function in sorted(wanted - {r[0] for r in await copy.fetch(leakproof)}):
            await copy.execute(f"ALTER FUNCTION pg_catalog.{function} LEAKPROOF")


async def is_superuser(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

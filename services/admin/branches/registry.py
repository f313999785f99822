"""The branch registry, admin.branches: every statement on it, run by the service role."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.admin.branches.names import name_taken
from shared.storage.audit import record_audit
from shared.storage.db import Database

__all__ = ["BranchRegistry", "BranchRow"]


@dataclass(frozen=True, slots=True)
class BranchRow:
    """One registered branch; ``database`` for a copy or restore, ``as_of`` and ``port`` for a
    point-in-time branch (a server of its own)."""

    id: int
    name: str
    database: str | None
    origin: str  # branch, restore or point_in_time
    created_at: datetime
    as_of: datetime | None
    port: int | None
    ready: bool
    bytes: int  # the database's size; 0 when the service role may not connect to it (yet)


# The database's size, for a role that may connect to it (the service role once
# the branch's privileges are copied); 0 otherwise, or while it does not exist.
_BRANCH_COLUMNS = (
    "b.id, b.name, b.database, b.origin, b.created_at, b.as_of, b.port, b.ready, coalesce(("
    "SELECT pg_database_size(d.oid) FROM pg_database d "
    "WHERE d.datname = b.database AND has_database_privilege(d.oid, 'CONNECT')), 0) AS bytes"
)


class BranchRegistry:
    """admin.branches: every statement on it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def reserve(self, name: str, database: str, origin: str, timeout: float) -> int:
        """Take ``name`` (not yet ready); ALREADY_EXISTS when it is taken."""
        return await self._insert(
            name,
            "INSERT INTO admin.branches (name, database, origin) VALUES ($1, $2, $3) RETURNING id",
            (database, origin),
            timeout,
        )

    async def reserve_server(self, name: str, as_of: datetime, port: int, timeout: float) -> int:
        """Take ``name`` for a point-in-time branch (not yet ready); ALREADY_EXISTS when it is taken."""
        return await self._insert(
            name,
            "INSERT INTO admin.branches (name, origin, as_of, port) "
            "VALUES ($1, 'point_in_time', $2, $3) RETURNING id",
            (as_of, port),
            timeout,
        )

    async def _insert(self, name: str, sql: str, args: tuple[object, ...], timeout: float) -> int:
        # ``sql`` inserts a row named $1 with ``args`` after it, returning its id.
        try:
            row = await self._db.write_row(sql, name, *args, timeout=timeout)
        except asyncpg.UniqueViolationError:
            raise name_taken(name) from None
        assert row is not None
        return int(row["id"])

    async def servers(self, timeout: float) -> list[BranchRow]:
        """Every point-in-time branch, ready or not."""
        rows = await self._db.fetch(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b "
            "WHERE b.origin = 'point_in_time' ORDER BY b.name",
            timeout=timeout,
        )
        return [BranchRow(**row) for row in rows]

    async def move(self, branch_id: int, port: int, timeout: float) -> None:
        """Record that the point-in-time branch ``branch_id`` now listens on ``port``."""
        await self._db.write_row(
            "UPDATE admin.branches SET port = $2 WHERE id = $1", branch_id, port, timeout=timeout
        )

    async def mark_ready(
        self, branch_id: int, name: str, details: Mapping[str, Any], timeout: float
    ) -> BranchRow | None:
        """Mark the branch complete and audit it, in one transaction; None if it was deleted meanwhile."""
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"UPDATE admin.branches b SET ready = true WHERE b.id = $1 RETURNING {_BRANCH_COLUMNS}",
                branch_id,
                timeout=timeout,
            )
            if row is not None:
                await record_audit(conn, f"branch/{name}", details, timeout=timeout)
        return None if row is None else BranchRow(**row)

    async def holds(self, branch_id: int, timeout: float) -> bool:
        """Whether the reservation ``branch_id`` still exists."""
        return bool(
            await self._db.fetchval("SELECT 1 FROM admin.branches WHERE id = $1", branch_id, timeout=timeout)
        )

    async def release(self, branch_id: int, timeout: float) -> None:
        """Forget the reservation ``branch_id`` (no audit: nothing was made)."""
        await self._db.write_row("DELETE FROM admin.branches WHERE id = $1", branch_id, timeout=timeout)

    async def find(self, name: str, timeout: float) -> BranchRow | None:
        """The branch ``name``, ready or not."""
        row = await self._db.fetchrow(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b WHERE b.name = $1", name, timeout=timeout
        )
        return None if row is None else BranchRow(**row)

    async def all(self, timeout: float) -> list[BranchRow]:
        """Every branch, by name."""
        rows = await self._db.fetch(
            f"SELECT {_BRANCH_COLUMNS} FROM admin.branches b ORDER BY b.name", timeout=timeout
        )
        return [BranchRow(**row) for row in rows]

    async def remove(self, branch_id: int, name: str, details: Mapping[str, Any], timeout: float) -> bool:
        """Forget the branch and audit it, in one transaction; False if it was already gone."""
        async with self._db.transaction(timeout=timeout) as conn:
            gone = await conn.fetchval(
                "DELETE FROM admin.branches WHERE id = $1 RETURNING id", branch_id, timeout=timeout
            )
            if gone is not None:
                await record_audit(conn, f"branch/{name}", details, timeout=timeout)
        return gone is not None

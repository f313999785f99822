"""Reading admin.audit_log, newest first, with typed rows; events are written by
:func:`shared.storage.audit.record_audit`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.storage.db import Database
from shared.storage.filters import SqlParams

__all__ = ["AuditEventRow", "AuditQuery", "AuditStore"]


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which events to read; an empty or None field does not filter."""

    actor_tenant: str | None = None
    actor_key_id: str = ""
    action: str = ""
    target_prefix: str = ""
    start: datetime | None = None
    end: datetime | None = None  # exclusive


@dataclass(frozen=True, slots=True)
class AuditEventRow:
    """One recorded event."""

    id: int
    at: datetime
    actor_key_id: str
    actor_tenant: str
    action: str
    target: str
    details: dict[str, Any]
    trace_id: str


class AuditStore:
    """The admin.audit_log table, as the service role reads it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def page(self, query: AuditQuery, before: int, limit: int, timeout: float) -> list[AuditEventRow]:
        """Up to ``limit`` events matching ``query`` with an id below ``before`` (0: from the newest),
        newest first."""
        params = SqlParams()
        conditions = []
        if before:
            conditions.append(f"id < {params.add(before)}")
        if query.actor_tenant is not None:
            conditions.append(f"actor_tenant = {params.add(query.actor_tenant)}")
        if query.actor_key_id:
            conditions.append(f"actor_key_id = {params.add(query.actor_key_id)}")
        if query.action:
            conditions.append(f"action = {params.add(query.action)}")
        if query.target_prefix:
            # starts_with: no LIKE metacharacters to escape.
            conditions.append(f"starts_with(target, {params.add(query.target_prefix)})")
        if query.start is not None:
            conditions.append(f"at >= {params.add(query.start)}")
        if query.end is not None:
            conditions.append(f"at < {params.add(query.end)}")
        where = " AND ".join(conditions) or "true"
        rows = await self._db.fetch(
            f"SELECT id, at, actor_key_id, actor_tenant, action, target, details, trace_id "
            f"FROM admin.audit_log WHERE {where} ORDER BY id DESC LIMIT {params.add(limit)}",
            *params.values,
            timeout=timeout,
        )
        return [AuditEventRow(**{**row, "details": json.loads(row["details"])}) for row in rows]

"""Reading the audit log (admin.audit_log); events are written by :func:`shared.audit.record_audit`."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from strata.admin.v1 import admin_pb2

from shared.db import Database
from shared.errors import FieldViolation, invalid_argument
from shared.filters import SqlParams
from shared.pagetoken import PageTokens, page_size
from shared.timestamps import to_timestamp

__all__ = ["AuditLog"]

DOMAIN = "strata.admin.v1"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACTION_RE = re.compile(r"/[A-Za-z0-9_.]+/[A-Za-z0-9_]+")


class AuditLog:
    """Pages through admin.audit_log, newest first."""

    def __init__(self, db: Database, tokens: PageTokens) -> None:
        self._db = db
        self._tokens = tokens

    async def page(
        self, request: admin_pb2.ListAuditEventsRequest, actor_tenant: str | None, timeout: float
    ) -> admin_pb2.ListAuditEventsResponse:
        """One page of events matching ``request``'s filters; made by ``actor_tenant``'s keys, if given."""
        errors: list[FieldViolation] = []
        size = page_size(request.page_size, errors)
        if request.actor_key_id and not _KEY_ID_RE.fullmatch(request.actor_key_id):
            errors.append(FieldViolation("actor_key_id", "is not a key id"))
        if request.action and not _ACTION_RE.fullmatch(request.action):
            errors.append(FieldViolation("action", "must be a full method name, e.g. /pkg.Service/Method"))
        if len(request.target_prefix) > 300:
            errors.append(FieldViolation("target_prefix", "must be at most 300 characters"))
        start = _time(request, "start_time", errors)
        end = _time(request, "end_time", errors)
        if start is not None and end is not None and end <= start:
            errors.append(FieldViolation("end_time", "must be after start_time"))
        if errors:
            raise invalid_argument(errors, domain=DOMAIN)
        query = [
            "admin.ListAuditEvents",
            actor_tenant or "",
            request.actor_key_id,
            request.action,
            request.target_prefix,
            start.isoformat() if start else "",
            end.isoformat() if end else "",
        ]
        # PageTokens.cursor refuses a cursor that is not a 64-bit integer (INVALID_ARGUMENT on page_token).
        before = self._tokens.cursor(request.page_token, query, 0, domain=DOMAIN)
        params = SqlParams()
        conditions = []
        if before:
            conditions.append(f"id < {params.add(before)}")
        if actor_tenant is not None:
            conditions.append(f"actor_tenant = {params.add(actor_tenant)}")
        if request.actor_key_id:
            conditions.append(f"actor_key_id = {params.add(request.actor_key_id)}")
        if request.action:
            conditions.append(f"action = {params.add(request.action)}")
        if request.target_prefix:
            # starts_with: no LIKE metacharacters to escape.
            conditions.append(f"starts_with(target, {params.add(request.target_prefix)})")
        if start is not None:
            conditions.append(f"at >= {params.add(start)}")
        if end is not None:
            conditions.append(f"at < {params.add(end)}")
        where = " AND ".join(conditions) or "true"
        rows = await self._db.fetch(
            f"SELECT id, at, actor_key_id, actor_tenant, action, target, details, trace_id "
            f"FROM admin.audit_log WHERE {where} ORDER BY id DESC LIMIT {params.add(size + 1)}",
            *params.values,
            timeout=timeout,
        )
        response = admin_pb2.ListAuditEventsResponse()
        for row in rows[:size]:
            event = response.events.add(
                id=row["id"],
                time=to_timestamp(row["at"]),
                actor_key_id=row["actor_key_id"],
                actor_tenant=row["actor_tenant"],
                action=row["action"],
                target=row["target"],
                trace_id=row["trace_id"],
            )
            event.details.update(json.loads(row["details"]))
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(query, rows[size - 1]["id"])
        return response


def _time(
    request: admin_pb2.ListAuditEventsRequest, field: str, errors: list[FieldViolation]
) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError):
        errors.append(FieldViolation(field, "is not a valid time"))
        return None

"""ListAuditEvents of ``strata.admin.v1.AdminService``: validation and mapping; SQL in :mod:`.store`.

Needs the ``admin`` scope; a tenant's admin sees what its own tenant's keys did.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from strata.admin.v1 import admin_pb2

from services.admin.audit.store import AuditQuery, AuditStore
from shared.api.callers import current_caller
from shared.api.errors import FieldViolation, invalid_argument
from shared.api.pagetoken import PageTokens, page_size
from shared.api.timestamps import to_timestamp
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["AuditServicer"]

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACTION_RE = re.compile(r"/[A-Za-z0-9_.]+/[A-Za-z0-9_]+")


class AuditServicer:
    """Pages through the audit log, newest first."""

    def __init__(self, store: AuditStore, tokens: PageTokens) -> None:
        self._store = store
        self._tokens = tokens

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: Context
    ) -> admin_pb2.ListAuditEventsResponse:
        caller = current_caller()
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
            raise invalid_argument(errors)
        query = AuditQuery(
            None if caller.is_operator else caller.tenant,
            request.actor_key_id,
            request.action,
            request.target_prefix,
            start,
            end,
        )
        # The page token is bound to the whole query, the caller's tenant included.
        bound = [
            "admin.ListAuditEvents",
            query.actor_tenant or "",
            query.actor_key_id,
            query.action,
            query.target_prefix,
            start.isoformat() if start else "",
            end.isoformat() if end else "",
        ]
        # PageTokens.cursor refuses a cursor that is not a 64-bit integer (INVALID_ARGUMENT on page_token).
        before = self._tokens.cursor(request.page_token, bound, 0)
        rows = await self._store.page(query, before, size + 1, deadline_timeout(context))
        response = admin_pb2.ListAuditEventsResponse()
        for row in rows[:size]:
            event = response.events.add(
                id=row.id,
                time=to_timestamp(row.at),
                actor_key_id=row.actor_key_id,
                actor_tenant=row.actor_tenant,
                action=row.action,
                target=row.target,
                trace_id=row.trace_id,
            )
            event.details.update(row.details)
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(bound, rows[size - 1].id)
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

"""The audit log: who changed what, when, in which trace.

Every operator mutation (API keys, tenants, record indexes, migrations,
cache invalidations, restores, branches) calls :func:`record_audit` with the
connection of the transaction that makes the change, so the change and its
record commit or roll back together. The actor and the action come from the
verified caller of the call being handled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import asyncpg
from opentelemetry import trace

from shared.api.callers import current_caller

__all__ = ["record_audit"]


async def record_audit(
    conn: asyncpg.Connection, target: str, details: Mapping[str, Any] | None = None, *, timeout: float = 30.0
) -> None:
    """Append one event for the current call acting on ``target`` (e.g. ``"tenant/acme"``).

    ``details`` must be JSON-serialisable and never hold secrets.
    """
    caller = current_caller()
    context = trace.get_current_span().get_span_context()
    trace_id = format(context.trace_id, "032x") if context.is_valid else ""
    await conn.execute(
        "INSERT INTO admin.audit_log (actor_key_id, actor_tenant, action, target, details, trace_id) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        caller.key_id,
        caller.tenant,
        caller.method,
        target,
        json.dumps(dict(details or {}), sort_keys=True, default=str),
        trace_id,
        timeout=timeout,
    )

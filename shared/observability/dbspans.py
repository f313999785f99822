"""What the asyncpg instrumentation leaves out of Postgres spans: the operation, and the function called.

The instrumentation names each span after the statement's first word and
records the statement text, but sets neither ``db.operation`` (the database
conventions' operation name) nor, for Strata's ``SELECT * FROM
kv.put_batch(…)`` style calls, which function the statement runs.
:class:`DatabaseOperations` adds both as each span starts, so a backend can
group and filter on them. Installed by :func:`shared.observability.telemetry.setup_telemetry`.
"""

from __future__ import annotations

import functools
import re

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Span, SpanProcessor

__all__ = ["DatabaseOperations", "statement_attributes"]

# (system, statement, operation) attribute names: the instrumentation's default
# conventions, and the stable ones it uses under OTEL_SEMCONV_STABILITY_OPT_IN=database.
_CONVENTIONS = (
    ("db.system", "db.statement", "db.operation"),
    ("db.system.name", "db.query.text", "db.operation.name"),
)
_PROCEDURE = "db.stored_procedure.name"  # no older name for it
_LEADING_COMMENTS = re.compile(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*(?:\n|$)\s*)*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
# A CTE's own statement: the first of these outside every parenthesis.
_MAIN_WORD = re.compile(r"[()]|\b(SELECT|INSERT|UPDATE|DELETE|MERGE)\b", re.I)
# ``SELECT <list without parentheses> FROM schema.function(``: Strata's calls of its
# own functions. A bare name (unnest) is a built-in; a subquery is not a call.
_FUNCTION_CALL = re.compile(
    r"SELECT\s(?:(?!\bFROM\b)[^()])*?\bFROM\s+([A-Za-z_]\w*\.[A-Za-z_]\w*)\s*\(", re.I
)


@functools.lru_cache(maxsize=1024)
def statement_attributes(statement: str) -> tuple[str, str]:
    """``(operation, function)`` of ``statement``; either may be "".

    The operation is the SQL keyword upper-cased (for ``WITH …``, the keyword
    of the statement the CTEs feed); the function is ``schema.name`` when the
    statement is a ``SELECT`` from a schema-qualified function call.
    """
    text = _LEADING_COMMENTS.sub("", statement, count=1)
    first = _FIRST_WORD.match(text)
    operation = first.group().upper() if first else ""
    if operation == "WITH":
        operation = _main_keyword(text) or operation
    call = _FUNCTION_CALL.match(text) if operation == "SELECT" else None
    return operation, call.group(1) if call else ""


def _main_keyword(text: str) -> str:
    """The first SELECT/INSERT/UPDATE/DELETE/MERGE at parenthesis depth 0, or ""."""
    depth = 0
    for found in _MAIN_WORD.finditer(text):
        token = found.group()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0:
            return token.upper()
    return ""


class DatabaseOperations(SpanProcessor):
    """Adds ``db.operation`` (and ``db.stored_procedure.name``) to each Postgres span as it starts."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Derive the attributes from the statement the instrumentation recorded."""
        attributes = span.attributes or {}
        for system, statement_key, operation_key in _CONVENTIONS:
            statement = attributes.get(statement_key)
            if attributes.get(system) != "postgresql" or not isinstance(statement, str):
                continue
            operation, function = statement_attributes(statement)
            if operation:
                span.set_attribute(operation_key, operation)
            if function:
                span.set_attribute(_PROCEDURE, function)

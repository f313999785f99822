"""shared.observability.dbspans: the operation and function of a Postgres span, from its statement."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.observability.dbspans import DatabaseOperations, statement_attributes


@pytest.mark.parametrize(
    ("statement", "operation", "function"),
    [
        ("SELECT * FROM kv.put_batch($1, $2, $3)", "SELECT", "kv.put_batch"),
        ("SELECT *\n  FROM tenants.declare_index($1)", "SELECT", "tenants.declare_index"),
        ("select key from kv.items where namespace = $1", "SELECT", ""),
        ("SELECT x FROM unnest($1::text[]) AS x", "SELECT", ""),  # a built-in, not one of ours
        ("SELECT (SELECT 1 FROM kv.f(1)) FROM t", "SELECT", ""),  # a subquery is not the call
        ("insert into kv.items values ($1)", "INSERT", ""),
        ("/* why */ -- and more\n  UPDATE kv.items SET v = $1", "UPDATE", ""),
        ("DELETE FROM kv.items WHERE key = $1", "DELETE", ""),
        ("WITH hits AS MATERIALIZED (SELECT 1) SELECT * FROM hits", "SELECT", ""),
        ("WITH gone AS (DELETE FROM t RETURNING *) INSERT INTO log SELECT * FROM gone", "INSERT", ""),
        ("LISTEN kv_changes", "LISTEN", ""),
        ("", "", ""),
    ],
)
def test_statement_attributes(statement, operation, function):
    assert statement_attributes(statement) == (operation, function)


def attributes_after_the_processor(attributes: dict[str, str]) -> dict[str, object]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # this test's own: the global one is left alone
    provider.add_span_processor(DatabaseOperations())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("SELECT", attributes=attributes):
        pass
    (span,) = exporter.get_finished_spans()
    return dict(span.attributes or {})


def test_a_postgres_span_gets_its_operation_and_function():
    attributes = attributes_after_the_processor(
        {"db.system": "postgresql", "db.statement": "SELECT * FROM kv.put_batch($1)"}
    )
    assert attributes["db.operation"] == "SELECT"
    assert attributes["db.stored_procedure.name"] == "kv.put_batch"


def test_under_the_stable_conventions_the_operation_is_db_operation_name():
    attributes = attributes_after_the_processor(
        {"db.system.name": "postgresql", "db.query.text": "DELETE FROM kv.items"}
    )
    assert attributes["db.operation.name"] == "DELETE"
    assert "db.operation" not in attributes


def test_other_spans_are_left_alone():
    attributes = attributes_after_the_processor({"db.system": "redis", "db.statement": "GET k"})
    assert attributes == {"db.system": "redis", "db.statement": "GET k"}

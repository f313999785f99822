"""shared.api.errors: StrataError's google.rpc.Status and the one exception mapping."""

from __future__ import annotations

import logging

import asyncpg
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from shared.api.errors import (
    DETAILS_KEY,
    Code,
    FieldViolation,
    StrataError,
    aborted,
    already_exists,
    from_exception,
    invalid_argument,
    not_found,
    unavailable,
)


def _detail(status: status_pb2.Status, message_type):
    found = []
    for detail in status.details:
        message = message_type()
        if detail.Unpack(message):
            found.append(message)
    assert len(found) == 1, f"expected one {message_type.__name__}, got {len(found)}"
    return found[0]


def _has_detail(status: status_pb2.Status, message_type) -> bool:
    return any(detail.Is(message_type.DESCRIPTOR) for detail in status.details)


# -- to_status ---------------------------------------------------------------


def test_to_status_carries_the_code_number_and_message():
    status = StrataError(Code.NOT_FOUND, "KEY_NOT_FOUND", "key 'k' not found").to_status("strata.test")
    assert status.code == 5
    assert status.message == "key 'k' not found"


def test_to_status_has_error_info_with_reason_domain_and_metadata():
    error = StrataError(
        Code.ABORTED,
        "REVISION_MISMATCH",
        "conflict",
        metadata={"key": "k", "current_revision": "7"},
    )
    info = _detail(error.to_status("strata.kv.v1"), error_details_pb2.ErrorInfo)
    assert info.reason == "REVISION_MISMATCH"
    assert info.domain == "strata.kv.v1"
    assert dict(info.metadata) == {"key": "k", "current_revision": "7"}


def test_the_domain_is_the_answering_services_not_the_errors():
    error = StrataError(Code.INTERNAL, "X", "m")
    for domain in ("strata.kv.v1", "strata.admin.v1"):
        assert _detail(error.to_status(domain), error_details_pb2.ErrorInfo).domain == domain


def test_to_status_has_a_bad_request_listing_every_violation():
    error = StrataError(
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "bad",
        violations=[FieldViolation("items[0].key", "required"), FieldViolation("value", "too big")],
    )
    bad = _detail(error.to_status("strata.test"), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("items[0].key", "required"),
        ("value", "too big"),
    ]


def test_to_status_without_violations_has_no_bad_request():
    status = StrataError(Code.NOT_FOUND, "KEY_NOT_FOUND", "m").to_status("strata.test")
    assert not _has_detail(status, error_details_pb2.BadRequest)


def test_to_status_has_retry_info_when_a_delay_is_given():
    status = unavailable("BACKEND_DOWN", "retry", retry_delay_s=1.5).to_status("strata.test")
    retry = _detail(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay == duration_pb2.Duration(seconds=1, nanos=500_000_000)


def test_to_status_without_a_delay_has_no_retry_info():
    status = unavailable("BACKEND_DOWN", "retry").to_status("strata.test")
    assert not _has_detail(status, error_details_pb2.RetryInfo)


def test_trailing_metadata_carries_the_serialized_status():
    error = invalid_argument([FieldViolation("key", "required")])
    ((key, value),) = error.trailing_metadata("strata.test")
    assert key == DETAILS_KEY == "grpc-status-details-bin"
    assert status_pb2.Status.FromString(value) == error.to_status("strata.test")


def test_metadata_is_copied_not_shared():
    metadata = {"a": "1"}
    error = StrataError(Code.INTERNAL, "X", "m", metadata=metadata)
    metadata["b"] = "2"
    assert error.metadata == {"a": "1"}


# -- constructors ------------------------------------------------------------


def test_invalid_argument_joins_the_violations_into_the_message():
    error = invalid_argument([FieldViolation("key", "required"), FieldViolation("value", "too big")])
    assert error.code == Code.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.message == "key: required; value: too big"
    assert str(error) == error.message


def test_invalid_argument_without_violations_has_a_generic_message():
    assert invalid_argument([]).message == "invalid request"


@pytest.mark.parametrize(
    ("factory", "code"),
    [
        (not_found, Code.NOT_FOUND),
        (aborted, Code.ABORTED),
        (already_exists, Code.ALREADY_EXISTS),
    ],
)
def test_constructors_set_code_reason_and_metadata(factory, code):
    error = factory("SOME_REASON", "message", name="x")
    assert (error.code, error.reason, error.message) == (code, "SOME_REASON", "message")
    assert error.metadata == {"name": "x"}


# -- from_exception ------------------------------------------------------------


def test_a_strata_error_is_returned_unchanged():
    error = not_found("KEY_NOT_FOUND", "gone")
    assert from_exception(error) is error


@pytest.mark.parametrize(
    ("exception", "code", "reason"),
    [
        (asyncpg.exceptions.UniqueViolationError, Code.ALREADY_EXISTS, "UNIQUE_VIOLATION"),
        (
            asyncpg.exceptions.ForeignKeyViolationError,
            Code.FAILED_PRECONDITION,
            "FOREIGN_KEY_VIOLATION",
        ),
        (asyncpg.exceptions.NotNullViolationError, Code.INVALID_ARGUMENT, "NOT_NULL_VIOLATION"),
        (asyncpg.exceptions.CheckViolationError, Code.INVALID_ARGUMENT, "CHECK_VIOLATION"),
        (
            asyncpg.exceptions.InvalidTextRepresentationError,
            Code.INVALID_ARGUMENT,
            "DATA_EXCEPTION",
        ),
        (asyncpg.exceptions.DivisionByZeroError, Code.INVALID_ARGUMENT, "DATA_EXCEPTION"),
        (asyncpg.exceptions.SerializationError, Code.ABORTED, "SERIALIZATION_FAILURE"),
        (asyncpg.exceptions.DeadlockDetectedError, Code.ABORTED, "DEADLOCK_DETECTED"),
        (
            asyncpg.exceptions.InsufficientPrivilegeError,
            Code.PERMISSION_DENIED,
            "INSUFFICIENT_PRIVILEGE",
        ),
        (asyncpg.exceptions.QueryCanceledError, Code.DEADLINE_EXCEEDED, "QUERY_CANCELED"),
        (
            asyncpg.exceptions.TooManyConnectionsError,
            Code.RESOURCE_EXHAUSTED,
            "DATABASE_RESOURCES_EXHAUSTED",
        ),
        (asyncpg.exceptions.AdminShutdownError, Code.UNAVAILABLE, "DATABASE_SHUTTING_DOWN"),
        (asyncpg.exceptions.CannotConnectNowError, Code.UNAVAILABLE, "DATABASE_SHUTTING_DOWN"),
        (
            asyncpg.exceptions.ConnectionFailureError,
            Code.UNAVAILABLE,
            "DATABASE_CONNECTION_FAILED",
        ),
    ],
)
def test_database_errors_map_by_sqlstate(exception, code, reason):
    error = from_exception(exception())
    assert (error.code, error.reason) == (code, reason)
    assert error.metadata == {"sqlstate": exception.sqlstate}


def test_a_database_error_message_is_not_echoed():
    secret = "Key (email)=(alice@example.com) already exists."
    error = from_exception(asyncpg.exceptions.UniqueViolationError(secret))
    assert error.code == Code.ALREADY_EXISTS
    assert "alice" not in error.message
    assert "alice" not in error.to_status("strata.test").SerializeToString().decode(errors="replace")


def test_an_unmapped_database_error_is_internal(caplog):
    with caplog.at_level(logging.ERROR, logger="shared.api.errors"):
        error = from_exception(asyncpg.exceptions.UndefinedTableError('relation "kv.secret" does not exist'))
    assert (error.code, error.reason, error.message) == (
        Code.INTERNAL,
        "INTERNAL",
        "internal error",
    )


@pytest.mark.parametrize(
    "exception",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(),
        OSError("network is unreachable"),
        # asyncpg's own state error on a connection Postgres shut down under.
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
    ],
)
def test_connection_failures_are_unavailable(exception):
    error = from_exception(exception)
    assert error.code == Code.UNAVAILABLE
    assert error.reason in {"DATABASE_UNAVAILABLE", "DATABASE_CONNECTION_FAILED"}


def test_a_timeout_is_deadline_exceeded():
    # asyncpg raises TimeoutError (asyncio.TimeoutError) when a statement timeout passes.
    error = from_exception(TimeoutError())
    assert (error.code, error.reason) == (Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")


def test_an_unexpected_exception_is_internal_with_a_generic_message(caplog):
    with caplog.at_level(logging.ERROR, logger="shared.api.errors"):
        error = from_exception(ValueError("password=hunter2 in row 17"))
    assert (error.code, error.reason) == (Code.INTERNAL, "INTERNAL")
    assert error.message == "internal error"
    serialized = error.to_status("strata.test").SerializeToString()
    assert b"hunter2" not in serialized
    assert error.metadata == {}


def test_an_unexpected_exception_is_logged_with_its_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="shared.api.errors"):
        from_exception(KeyError("boom-marker"))
    (record,) = [r for r in caplog.records if r.name == "shared.api.errors"]
    assert record.exc_info is not None
    assert "boom-marker" in str(record.exc_info[1])

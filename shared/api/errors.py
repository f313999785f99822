"""One mapping from failures to gRPC status codes with ``google.rpc.Status`` details.

Handlers raise :class:`StrataError` (or let database errors escape); the server
bootstrap turns every exception into a status with an ``ErrorInfo`` (stable
UPPER_SNAKE reason) and, for bad input, a ``BadRequest`` listing each field
violation. Nothing else decides status codes, and no stack trace leaves the
process.

An error does not name its ``ErrorInfo`` domain: whoever answers the call
gives it (:meth:`StrataError.to_status`), the package of the service called
(``strata.kv.v1``), so every error of one service carries one domain, those
of the shared layers and of the gateway's own refusals included.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import asyncpg
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Code",
    "FieldViolation",
    "StrataError",
    "aborted",
    "already_exists",
    "from_exception",
    "invalid_argument",
    "not_found",
    "raise_invalid",
    "unavailable",
]

DETAILS_KEY = "grpc-status-details-bin"
_log = logging.getLogger(__name__)


class Code(enum.IntEnum):
    """The canonical status codes (``google.rpc.Code``), numbered as on the wire.

    Errors are made with these, so the layers below the RPC layer (storage,
    cache, documents) need no gRPC; the server bootstrap and the gateway
    answer with the ``grpc.StatusCode`` of the same name.
    """

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: its path (``items[3].key``) and what is wrong."""

    field: str
    description: str


class StrataError(Exception):
    """A failure with a status code, a stable reason and optional details.

    ``reason`` is an UPPER_SNAKE identifier callers may switch on; ``metadata``
    goes into the ErrorInfo; ``violations`` into a BadRequest detail.
    """

    def __init__(
        self,
        code: Code,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[FieldViolation] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_delay_s = retry_delay_s

    def to_status(self, domain: str) -> status_pb2.Status:
        """The ``google.rpc.Status`` carried in ``grpc-status-details-bin``, its ErrorInfo in ``domain``
        (the proto package of the service that answers)."""
        status = status_pb2.Status(code=self.code.value, message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=domain, metadata=self.metadata)
        _pack(status, info)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            _pack(status, bad)
        if self.retry_delay_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_delay_s * 1e9))
            _pack(status, retry)
        return status

    def trailing_metadata(self, domain: str) -> tuple[tuple[str, bytes], ...]:
        """Trailing metadata that carries :meth:`to_status`."""
        return ((DETAILS_KEY, self.to_status(domain).SerializeToString()),)


def raise_invalid(violations: list[FieldViolation]) -> None:
    """Raise :func:`invalid_argument` naming ``violations``, if there are any."""
    if violations:
        raise invalid_argument(violations)


def invalid_argument(violations: Iterable[FieldViolation]) -> StrataError:
    """INVALID_ARGUMENT with a BadRequest naming every violated field."""
    items = tuple(violations)
    message = "; ".join(f"{v.field}: {v.description}" for v in items) or "invalid request"
    return StrataError(Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", message, violations=items)


def not_found(reason: str, message: str, **metadata: str) -> StrataError:
    """NOT_FOUND with ``reason`` (e.g. KEY_NOT_FOUND) and metadata naming the thing."""
    return StrataError(Code.NOT_FOUND, reason, message, metadata=metadata)


def aborted(reason: str, message: str, **metadata: str) -> StrataError:
    """ABORTED: an optimistic-concurrency check (revision, etag) failed."""
    return StrataError(Code.ABORTED, reason, message, metadata=metadata)


def already_exists(reason: str, message: str, **metadata: str) -> StrataError:
    """ALREADY_EXISTS for a create whose identity is taken."""
    return StrataError(Code.ALREADY_EXISTS, reason, message, metadata=metadata)


def unavailable(reason: str, message: str, *, retry_delay_s: float | None = None) -> StrataError:
    """UNAVAILABLE: a dependency is down; the caller may retry."""
    return StrataError(Code.UNAVAILABLE, reason, message, retry_delay_s=retry_delay_s)


# SQLSTATE classes and codes → (gRPC code, reason). Checked most specific first.
_SQLSTATE_MAP: dict[str, tuple[Code, str]] = {
    "23505": (Code.ALREADY_EXISTS, "UNIQUE_VIOLATION"),
    "23503": (Code.FAILED_PRECONDITION, "FOREIGN_KEY_VIOLATION"),
    "23502": (Code.INVALID_ARGUMENT, "NOT_NULL_VIOLATION"),
    "23514": (Code.INVALID_ARGUMENT, "CHECK_VIOLATION"),
    "22": (Code.INVALID_ARGUMENT, "DATA_EXCEPTION"),
    "40001": (Code.ABORTED, "SERIALIZATION_FAILURE"),
    "40P01": (Code.ABORTED, "DEADLOCK_DETECTED"),
    "42501": (Code.PERMISSION_DENIED, "INSUFFICIENT_PRIVILEGE"),
    "57014": (Code.DEADLINE_EXCEEDED, "QUERY_CANCELED"),
    # lock_timeout: the statement (and its transaction) was rolled back; safe to retry.
    "55P03": (Code.UNAVAILABLE, "LOCK_NOT_AVAILABLE"),
    "53": (Code.RESOURCE_EXHAUSTED, "DATABASE_RESOURCES_EXHAUSTED"),
    "57P": (Code.UNAVAILABLE, "DATABASE_SHUTTING_DOWN"),
    "08": (Code.UNAVAILABLE, "DATABASE_CONNECTION_FAILED"),
}


def from_exception(exc: BaseException) -> StrataError:
    """Map any exception escaping a handler to a :class:`StrataError`.

    Database errors map by SQLSTATE; connection loss and timeouts to
    UNAVAILABLE / DEADLINE_EXCEEDED; anything unexpected to INTERNAL with a
    generic message (the exception is logged, never sent).
    """
    if isinstance(exc, StrataError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        for prefix in sorted(_SQLSTATE_MAP, key=len, reverse=True):
            if sqlstate.startswith(prefix):
                code, reason = _SQLSTATE_MAP[prefix]
                return StrataError(code, reason, _database_message(code), metadata={"sqlstate": sqlstate})
    # Before OSError: TimeoutError is one. A client-side statement timeout lands here.
    if isinstance(exc, TimeoutError):
        return StrataError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the deadline passed")
    if isinstance(exc, _CONNECTION_LOST):
        return StrataError(Code.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached; retry")
    _log.exception("unexpected error in handler", exc_info=exc)
    return StrataError(Code.INTERNAL, "INTERNAL", "internal error")


# A connection that failed under the call (an unusable client protocol state included).
_CONNECTION_LOST = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
)


def _database_message(code: Code) -> str:
    # Never echo the server's message: it can contain other rows' values.
    return {
        Code.ALREADY_EXISTS: "a row with this identity already exists",
        Code.ABORTED: "the transaction conflicted with another; retry",
        Code.DEADLINE_EXCEEDED: "the statement was cancelled at the deadline",
        Code.UNAVAILABLE: "the database is unavailable; retry",
    }.get(code, "the database rejected the request")


def _pack(status: status_pb2.Status, message: object) -> None:
    detail = any_pb2.Any()
    detail.Pack(message)  # type: ignore[arg-type]
    status.details.append(detail)

"""Making calls in tests: a key's metadata, and the error a call must end with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from strata.admin.v1 import admin_pb2_grpc

from tests.support.errors import error_info, field_violations

__all__ = ["assert_invalid", "bearer", "every_page", "rpc_error"]


def bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``api_key``."""
    return (("authorization", f"Bearer {api_key}"),)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error ``call`` ends with; the test fails if it answers."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_invalid(error: grpc.aio.AioRpcError, *fields: str) -> None:
    """``error`` is INVALID_ARGUMENT (reason INVALID_ARGUMENT) naming each of ``fields``."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    violations = field_violations(error)
    for field in fields:
        assert field in violations, f"{field} not in {violations}"
    assert error_info(error).reason == "INVALID_ARGUMENT"


async def every_page(fetch: Callable[[str], Awaitable[Any]]) -> list[Any]:
    """Every page of a listing: ``fetch(page_token)`` from "" until a page has no next_page_token."""
    pages = [await fetch("")]
    while pages[-1].next_page_token:
        pages.append(await fetch(pages[-1].next_page_token))
    return pages


class AdminStubs:
    """The stubs of admin's four services on one channel, each method found by its name.

    Tests call methods of all four (a key, then a backup, then the audit log);
    this keeps them from naming the service each method belongs to.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stubs = (
            admin_pb2_grpc.ApiKeyServiceStub(channel),
            admin_pb2_grpc.OperationsServiceStub(channel),
            admin_pb2_grpc.BackupServiceStub(channel),
            admin_pb2_grpc.AuditServiceStub(channel),
        )

    def __getattr__(self, method: str) -> Any:
        for stub in self._stubs:
            if hasattr(stub, method):
                return getattr(stub, method)
        raise AttributeError(f"no admin service has a method {method!r}")

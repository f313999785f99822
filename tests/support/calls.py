"""Making calls in tests: a key's metadata, and the error a call must end with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

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

"""Which failed forwards the gateway may send again to another address: only those never sent."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.proxy import never_reached
from tests.support.errors import DETAILS_KEY


def _error(code: grpc.StatusCode, details: str, reason: str | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if reason is not None:
        status = status_pb2.Status(code=code.value[0], message=details)
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="strata"))
        trailing.add(DETAILS_KEY, status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
        "Connection refused",
    ],
)
def test_a_connection_never_made_may_be_retried(details):
    assert never_reached(_error(grpc.StatusCode.UNAVAILABLE, details))


@pytest.mark.parametrize("details", ["Socket closed", "Connection reset by peer", ""])
def test_a_connection_lost_mid_call_is_not_retried(details):
    # The handler may have run: sending the call again could apply a write twice.
    assert not never_reached(_error(grpc.StatusCode.UNAVAILABLE, details))


def test_a_draining_service_may_be_retried_other_answers_not():
    assert never_reached(_error(grpc.StatusCode.UNAVAILABLE, "draining", reason="SHUTTING_DOWN"))
    assert not never_reached(_error(grpc.StatusCode.UNAVAILABLE, "db down", reason="DATABASE_UNAVAILABLE"))
    assert not never_reached(_error(grpc.StatusCode.INTERNAL, "failed to connect to all addresses"))

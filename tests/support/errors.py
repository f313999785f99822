"""Reading a gRPC error's details: its google.rpc.Status, ErrorInfo and BadRequest."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def status_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status carried by ``error``'s trailing metadata."""
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} in {error!r}")


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of ``error``."""
    for detail in status_details(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, str]:
    """Field path → description from the BadRequest detail of ``error``."""
    for detail in status_details(error).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")

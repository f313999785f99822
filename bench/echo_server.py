"""The ceiling: a bare grpc.aio server that answers every call with its request bytes.

Built like a Strata process (uvloop, the same server options), minus
everything Strata adds, so "service vs echo" measures exactly that.
``python -m bench.echo_server PORT`` prints ``READY`` once bound.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import uvloop

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def serve(port: int) -> None:
    """Serve the echo method on 127.0.0.1:``port`` until killed."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))

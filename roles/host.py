"""Hosting several roles in one process: build each, serve each on its port, stop them in order."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from gateway.app import build_gateway_server
from services.admin.app import build_admin_server
from services.kv.app import build_kv_server
from services.tenants.app import build_tenants_server
from services.vector.app import build_vector_server
from shared.config.settings import ROLES, ConfigError, Settings, load_settings
from shared.observability.logs import configure_logging
from shared.observability.telemetry import setup_telemetry, shutdown_telemetry
from shared.rpc.local import LocalUnary
from shared.rpc.server import StrataServer

__all__ = ["SERVICE_BUILDERS", "main", "serve_roles"]

# How each service role is built, as its own process builds it; the gateway, last, is built with
# their handlers (build_gateway_server).
SERVICE_BUILDERS: dict[str, Callable[[Settings], Awaitable[StrataServer]]] = {
    "kv": build_kv_server,
    "tenants": build_tenants_server,
    "vector": build_vector_server,
    "admin": build_admin_server,
}


async def serve_roles(settings: Settings, stop: asyncio.Event) -> None:
    """Build and start ``settings.roles`` in order, print ``READY <role> host:port`` for each, serve
    until ``stop`` is set, then stop the gateway first (it drains the calls it accepted while the
    services still answer them) and the services after it.

    The gateway hands unary calls of the services here to their handlers in-process (one hop);
    streams, uploads and the services elsewhere are forwarded over gRPC as from its own process.
    """
    servers: list[tuple[str, StrataServer]] = []
    local: dict[str, LocalUnary] = {}  # the services' unary handlers, for the gateway here
    try:
        for role in settings.roles:
            if role == "gateway":  # last: every service of this process is built by then
                server = await build_gateway_server(settings, local)
            else:
                server = await SERVICE_BUILDERS[role](settings)
                local.update(server.local_handlers)
            servers.append((role, server))
            port = await server.start(settings.port_of(role))
            # Tells a parent process (launcher, tests) that the role's port is bound.
            print(f"READY {role} {settings.host}:{port}", flush=True)
        await stop.wait()
    finally:
        for role, server in servers:
            if role == "gateway":
                await server.stop()
        await asyncio.gather(
            *(server.stop() for role, server in servers if role != "gateway"), return_exceptions=True
        )


def main() -> None:
    """Entry point of ``python -m roles``: settings, logs, telemetry, serve until SIGTERM."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"strata-roles: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    name = "all" if settings.roles == ROLES else "+".join(settings.roles)
    configure_logging(name, settings.log_level)
    setup_telemetry(f"strata-{name}", settings.otlp_protocol)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_roles(settings, stop)

    try:
        uvloop.run(run())
    except ConfigError as exc:  # a role's own check (admin without a key pepper, ...)
        print(f"strata-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown_telemetry()

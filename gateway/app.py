"""Wires the gateway: routes, upstreams, key resolution, rate limits, one proxy handler."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.auth import FailedAttempts, KeyResolver
from gateway.proxy import Proxy
from gateway.ratelimit import RateLimiter
from gateway.routes import ROUTED_SERVICES, build_routes
from gateway.streams import OpenStreams
from gateway.upstreams import Upstream
from shared.cache.redisclient import open_redis
from shared.config.settings import Settings, require_internal_secret
from shared.rpc.local import LocalUnary
from shared.rpc.server import StrataServer, run_service
from shared.rpc.tls import internal_channel_credentials

__all__ = ["build_gateway_server", "main"]


async def build_gateway_server(
    settings: Settings, local: Mapping[str, LocalUnary] | None = None
) -> StrataServer:
    """The gateway's server, proxying every routed service to its upstreams; ``local``: the unary
    handlers of services in this process, which its calls are handed to in-process instead."""
    secret = require_internal_secret(settings)
    server = StrataServer(settings, "gateway", public=True)
    credentials = internal_channel_credentials(settings)
    upstreams = {
        name: Upstream(
            name,
            settings.upstreams_of(name),
            settings.max_message_bytes,
            max_streams=settings.gateway_max_streams,
            streams_per_connection=settings.max_concurrent_streams,
            credentials=credentials,
        )
        for name in ROUTED_SERVICES
    }
    limiter = RateLimiter(open_redis(settings.redis_url), settings.rate_limit_rps, settings.rate_limit_burst)
    keys = KeyResolver(upstreams["admin"], secret, settings.key_cache_ttl_s, local)
    streams = OpenStreams(
        keys, settings.streams_per_key, settings.streams_per_tenant, settings.gateway_max_streams
    )
    failures = FailedAttempts(settings.auth_failures_per_peer_rps, settings.auth_failures_per_peer_burst)
    proxy = Proxy(build_routes(), upstreams, keys, limiter, secret, server.gate, streams, failures, local)
    server.add_generic_handler(
        proxy, [service.full_name for services in ROUTED_SERVICES.values() for service in services]
    )

    async def mirror(upstream: str, serving: bool) -> None:
        # Each proxied service's health is its upstream's; the gateway's own is all of them.
        for service in ROUTED_SERVICES[upstream]:
            await server.set_serving(service.full_name, serving)
        await server.set_serving("", all(u.serving for u in upstreams.values()))

    for upstream in upstreams.values():
        upstream.start(mirror)
        server.after_drain(upstream.close)
    server.after_drain(limiter.close)
    server.after_drain(streams.close_all)
    return server


def main() -> None:
    """Entry point of the gateway process."""
    run_service("gateway", build_gateway_server)

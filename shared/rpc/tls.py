"""TLS for Strata's two faces: the gateway's public port and the internal hop.

The public port uses ``STRATA_TLS_*`` (a certificate, optionally a client CA
for mutual TLS). The internal hop (gateway → services, and every Strata
process that calls a service: the launcher, tenants' purge, admin's health
checks, container health checks) uses ``STRATA_INTERNAL_TLS_*``: one CA, and
a certificate and key that each process presents both as a server and as a
client. Services then require a client certificate signed by that CA, so a
connection to a service port proves it comes from a Strata process before any
signed identity is read. Unset: the internal hop is plaintext (one host, or a
private network).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import grpc

from shared.config.settings import Settings

__all__ = [
    "internal_channel",
    "internal_channel_credentials",
    "internal_server_credentials",
    "internal_sync_channel",
    "open_channel",
    "public_server_credentials",
]

ChannelOptions = Sequence[tuple[str, str | int]]


def public_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gateway port's TLS (mutual when a client CA is given); None: plaintext."""
    if not settings.tls_cert_file:
        return None
    client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def internal_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """A service port's mutual TLS: this process's certificate, clients signed by the internal CA."""
    if not settings.internal_tls_ca_file:
        return None
    return grpc.ssl_server_credentials(
        [(_read(settings.internal_tls_key_file), _read(settings.internal_tls_cert_file))],
        root_certificates=_read(settings.internal_tls_ca_file),
        require_client_auth=True,
    )


def internal_channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """What a Strata process presents to a service: trust the internal CA, show its own certificate."""
    if not settings.internal_tls_ca_file:
        return None
    return _client_credentials(
        settings.internal_tls_ca_file, settings.internal_tls_cert_file, settings.internal_tls_key_file
    )


@functools.cache
def _client_credentials(ca_file: str, cert_file: str, key_file: str) -> grpc.ChannelCredentials:
    # Read once per process: admin opens a channel per component on every health check.
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    options: ChannelOptions | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: over TLS with ``credentials``, plaintext with None."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def internal_channel(
    settings: Settings,
    address: str,
    *,
    options: ChannelOptions | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to a service at ``address``: mutual TLS when configured, else plaintext."""
    return open_channel(
        address, internal_channel_credentials(settings), options=options, interceptors=interceptors
    )


def internal_sync_channel(settings: Settings, address: str) -> grpc.Channel:
    """A blocking channel to a service at ``address``, as :func:`internal_channel`."""
    credentials = internal_channel_credentials(settings)
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()

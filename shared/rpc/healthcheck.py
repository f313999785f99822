"""``python -m shared.rpc.healthcheck [--gateway] HOST:PORT [SERVICE]``: exit 0 when health says SERVING.

For container health checks, which have no grpcurl. A service port is called
as Strata's own processes call it: with the internal certificate when
``STRATA_INTERNAL_TLS_*`` is set (:mod:`shared.rpc.tls`), else plaintext.
``--gateway`` checks the gateway's public port instead, in plaintext (a
gateway given ``STRATA_TLS_*`` is checked from where its clients call it,
with their CA).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config.settings import ConfigError, load_settings
from shared.rpc.tls import internal_sync_channel

_USAGE = "usage: python -m shared.rpc.healthcheck [--gateway] HOST:PORT [SERVICE]"


def main(argv: list[str]) -> int:
    """Check ``HOST:PORT`` (and ``SERVICE``, default the whole server); 0 if SERVING, 1 if not, 2: misuse."""
    gateway = bool(argv) and argv[0] == "--gateway"
    args = argv[1:] if gateway else argv
    if not 1 <= len(args) <= 2:
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    target = args[0]
    channel = grpc.insecure_channel(target) if gateway else internal_sync_channel(settings, target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args[1] if len(args) > 1 else ""), timeout=3
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

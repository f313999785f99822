"""What a benchmark runs against: a Strata deployment's addresses and credentials."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from shared.api.callers import OPERATOR_SCOPE, Caller
from shared.rpc.identity import sign_caller, signing_interceptors

__all__ = ["Target", "bench_caller"]


@dataclass(frozen=True, slots=True)
class Target:
    """A running Strata: its ports on 127.0.0.1, an admin API key, the internal secret, the backends."""

    ports: dict[str, int]  # "gateway", "kv", "tenants", "vector", "admin"; "all": the one-process gateway
    api_key: str
    internal_secret: str
    database_url: str  # the service role, as the services connect
    redis_url: str
    pids: dict[str, int]  # process → pid, for resident-memory figures
    one_process_pid: int = 0  # the all-roles process (python -m roles), whose gateway is "all"

    def address(self, process: str) -> str:
        """host:port of ``process``."""
        return f"127.0.0.1:{self.ports[process]}"

    def bearer(self) -> list[tuple[str, str]]:
        """Metadata for a call through the gateway."""
        return [("authorization", f"Bearer {self.api_key}")]

    def signed(self, method: str, body: bytes, tenant: str = "bench") -> list[tuple[str, str]]:
        """Metadata for a call of ``method`` with ``body`` straight to a service port, as the gateway
        would sign it (good for STRATA_IDENTITY_MAX_AGE_S: the bench's stack allows a whole run)."""
        return sign_caller(self.internal_secret.encode(), method, bench_caller(tenant), body=body)

    def signing(self, tenant: str = "bench") -> dict[str, str]:
        """What a load worker needs to sign each of its calls itself (a ``grpc`` job's ``signed_as``)."""
        return {"secret": self.internal_secret, "tenant": tenant}

    def channel(self, process: str, tenant: str = "bench") -> grpc.aio.Channel:
        """A channel to ``process`` whose calls are signed, each for its own request."""
        return grpc.aio.insecure_channel(
            self.address(process),
            interceptors=signing_interceptors(self.internal_secret.encode(), bench_caller(tenant)),
        )


def bench_caller(tenant: str) -> Caller:
    """Who direct calls are made as: the tenant's operator."""
    return Caller(tenant, frozenset({OPERATOR_SCOPE}), "bench")

"""What a benchmark runs against: a Strata deployment's addresses and credentials."""

from __future__ import annotations

from dataclasses import dataclass

from shared.identity import Caller, sign_caller

__all__ = ["Target"]


@dataclass(frozen=True, slots=True)
class Target:
    """A running Strata: its ports on 127.0.0.1, an admin API key, the internal secret, the backends."""

    ports: dict[str, int]  # "gateway", "kv", "tenants", "vector", "admin"
    api_key: str
    internal_secret: str
    database_url: str  # the service role, as the services connect
    redis_url: str
    pids: dict[str, int]  # process → pid, for resident-memory figures

    def address(self, process: str) -> str:
        """host:port of ``process``."""
        return f"127.0.0.1:{self.ports[process]}"

    def bearer(self) -> list[tuple[str, str]]:
        """Metadata for a call through the gateway."""
        return [("authorization", f"Bearer {self.api_key}")]

    def signed(self, method: str, tenant: str = "bench") -> list[tuple[str, str]]:
        """Metadata for a call straight to a service port, as the gateway would sign it (valid 60 s)."""
        caller = Caller(tenant, frozenset({"operator"}), "bench")
        return sign_caller(self.internal_secret.encode(), method, caller)

"""Typed settings read once from the environment.

Every process builds one :class:`Settings` with :func:`load_settings` at start;
nothing else in Strata reads ``os.environ`` for its own configuration. A bad
value fails the start with a :class:`ConfigError` naming the variable. The
server URLs are checked in full (scheme, hosts, ports), never echoing a
password. The standard ``OTEL_*`` variables Strata relies on are checked here
too (the SDK would ignore a bad one, or fail later), though
:mod:`shared.observability.telemetry` and the SDK read them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.config.reader import ConfigError, EnvReader
from shared.config.urls import endpoint_problem, postgres_url_problem, redis_url_problem

__all__ = ["ConfigError", "Settings", "load_settings", "require_internal_secret"]

# Every role a process may host, in the order a process starts them (the gateway last: it checks
# the others' health).
ROLES = ("kv", "tenants", "vector", "admin", "gateway")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Strata process is configured with.

    Ports and the data folder have defaults for the embedded mode; the URLs are
    empty unless external servers are used.
    """

    data_dir: Path = Path(".strata")
    host: str = "127.0.0.1"
    gateway_port: int = 50051
    kv_port: int = 50061
    tenants_port: int = 50062
    vector_port: int = 50063
    admin_port: int = 50064
    database_url: str = ""
    migrate_database_url: str = ""
    database_read_urls: tuple[str, ...] = ()  # streaming replicas, for reads that allow one
    read_strategy: str = "least_in_flight"  # or round_robin, lowest_latency (see shared.storage.replicas)
    replica_max_lag_bytes: int = 16 * 1024 * 1024  # more replay lag than this opens the breaker
    replica_max_lag_s: float = 5.0  # ... and so does a replica this far behind in time
    replica_probe_interval_s: float = 0.5
    replica_failures_to_open: int = 3  # consecutive failed calls or probes
    replica_open_s: float = 2.0  # an open breaker's wait before its half-open probe
    embedded_replicas: int = 0  # streaming replicas of the embedded Postgres
    # Processes per service (STRATA_<SERVICE>_REPLICAS): kv, tenants, vector and the gateway.
    process_counts: tuple[tuple[str, int], ...] = ()
    # The roles one ``python -m roles`` process hosts (STRATA_ROLES: "all", or some of ROLES).
    roles: tuple[str, ...] = ROLES
    # Point-in-time recovery of a Postgres Strata manages (embedded mode): the launcher
    # sets STRATA_PITR_DIR for admin; empty means PITR belongs to the provider.
    pitr_dir: str = ""
    pitr_base_backup_interval_s: float = 3600.0
    pitr_keep_base_backups: int = 2
    redis_url: str = ""
    embedded_pg_port: int = 55432
    embedded_redis_port: int = 56379
    pool_min_size: int = 2
    pool_max_size: int = 10
    pool_acquire_timeout_s: float = 1.0  # longest a call waits for a pooled connection
    slow_query_ms: float = 200.0
    stats_interval_s: float = 5.0
    max_message_bytes: int = 8 * 1024 * 1024
    max_concurrent_streams: int = 256  # per client connection (HTTP/2 SETTINGS)
    max_calls_in_flight: int = 4096  # per process; more are refused at once
    shutdown_grace_s: float = 10.0
    cache_local_entries: int = 100_000
    cache_ttl_s: float = 300.0
    kv_max_value_bytes: int = 1024 * 1024
    kv_max_key_bytes: int = 4096
    kv_max_batch: int = 1000
    kv_sweep_interval_s: float = 1.0
    kv_history_revisions: int = 100_000
    log_level: str = "INFO"
    internal_secret: str = ""
    key_pepper: str = ""
    key_cache_ttl_s: float = 1.0
    # How old a signed caller identity may be when a service checks it (clock skew and one hop).
    identity_max_age_s: float = 10.0
    rate_limit_rps: float = 1000.0
    rate_limit_burst: int = 2000
    # Gateway: failed authentications one peer address may make (token bucket), before it is refused.
    auth_failures_per_peer_rps: float = 5.0
    auth_failures_per_peer_burst: int = 50
    # Gateway: server streams (Watch, Backup) open at once, per API key, per tenant and in all.
    streams_per_key: int = 64
    streams_per_tenant: int = 128
    gateway_max_streams: int = 1024
    # Watch ends itself after this long (UNAVAILABLE STREAM_MAX_AGE, with resume_revision): the
    # client resumes through the gateway, which authenticates its key again.
    stream_max_age_s: float = 1800.0
    upstreams: tuple[tuple[str, tuple[str, ...]], ...] = ()
    metrics_ports: tuple[tuple[str, int], ...] = ()  # process → Prometheus port; absent: no metrics
    otlp_protocol: str = "grpc"  # OTLP trace export: "grpc" or "http/protobuf"
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # The internal hop's mutual TLS (shared.rpc.tls): all three, or none for plaintext.
    internal_tls_ca_file: str = ""
    internal_tls_cert_file: str = ""
    internal_tls_key_file: str = ""
    restore_max_bytes: int = 10 * 1024**3

    @property
    def embedded(self) -> bool:
        """True when Strata starts its own Postgres and Redis (no URLs given)."""
        return not self.database_url and not self.redis_url

    def upstreams_of(self, service: str) -> tuple[str, ...]:
        """Where ``service`` runs (``STRATA_<SERVICE>_UPSTREAMS``); unset: this host, its port.

        The gateway routes there; admin checks health there.
        """
        for name, addresses in self.upstreams:
            if name == service:
                return addresses
        return (f"127.0.0.1:{self.port_of(service)}",)

    def processes_of(self, service: str) -> int:
        """How many processes run ``service`` (``STRATA_<SERVICE>_REPLICAS``, default 1)."""
        return dict(self.process_counts).get(service, 1)

    def metrics_port_of(self, process: str) -> int:
        """The Prometheus port of ``process`` (``STRATA_<NAME>_METRICS_PORT``); 0 when metrics are off."""
        return dict(self.metrics_ports).get(process, 0)

    def port_of(self, service: str) -> int:
        """The listening port of ``service`` ("kv", "tenants", "vector", "admin", "gateway")."""
        try:
            port: int = getattr(self, f"{service}_port")
        except AttributeError:
            raise ConfigError(f"unknown service {service!r}") from None
        return port


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: ``os.environ``).

    Raises :class:`ConfigError` for a malformed value, e.g.
    ``STRATA_KV_PORT=abc``, a ``DATABASE_URL`` that is not a postgres URL or
    ``OTEL_TRACES_SAMPLER=sometimes``.
    """
    env = os.environ if environ is None else environ
    reader = EnvReader(env)
    defaults = Settings()
    otlp_protocol = _check_otel(reader)
    database_url = reader.url("DATABASE_URL", postgres_url_problem)
    # A single server, or a Redis Cluster by some of its nodes (see shared.cache.redisclient).
    redis_url = reader.url("REDIS_URL", redis_url_problem)
    if bool(database_url) != bool(redis_url):
        raise ConfigError("set both DATABASE_URL and REDIS_URL (external mode) or neither (embedded mode)")
    if env.get("STRATA_ADMIN_REPLICAS", "1").strip() not in ("", "1"):
        raise ConfigError(
            "STRATA_ADMIN_REPLICAS: admin runs as one process (it holds the owner role, migrations, backups)"
        )
    return _check_tls(
        Settings(
            data_dir=Path(env.get("STRATA_DATA_DIR", str(defaults.data_dir))),
            host=env.get("STRATA_HOST", defaults.host),
            gateway_port=reader.port("STRATA_GATEWAY_PORT", defaults.gateway_port),
            kv_port=reader.port("STRATA_KV_PORT", defaults.kv_port),
            tenants_port=reader.port("STRATA_TENANTS_PORT", defaults.tenants_port),
            vector_port=reader.port("STRATA_VECTOR_PORT", defaults.vector_port),
            admin_port=reader.port("STRATA_ADMIN_PORT", defaults.admin_port),
            database_url=database_url,
            migrate_database_url=reader.url("STRATA_MIGRATE_DATABASE_URL", postgres_url_problem)
            or database_url,
            database_read_urls=reader.urls("DATABASE_READ_URLS", postgres_url_problem),
            read_strategy=reader.choice(
                "STRATA_READ_STRATEGY", defaults.read_strategy, tuple(s.upper() for s in READ_STRATEGIES)
            ).lower(),
            replica_max_lag_bytes=reader.integer(
                "STRATA_REPLICA_MAX_LAG_BYTES", defaults.replica_max_lag_bytes, 0, 1 << 50
            ),
            replica_max_lag_s=reader.number("STRATA_REPLICA_MAX_LAG_S", defaults.replica_max_lag_s, 0.0),
            replica_probe_interval_s=reader.number(
                "STRATA_REPLICA_PROBE_INTERVAL_S", defaults.replica_probe_interval_s, 0.01
            ),
            replica_failures_to_open=reader.integer(
                "STRATA_REPLICA_FAILURES_TO_OPEN", defaults.replica_failures_to_open, 1, 1000
            ),
            replica_open_s=reader.number("STRATA_REPLICA_OPEN_S", defaults.replica_open_s, 0.01),
            embedded_replicas=reader.integer("STRATA_EMBEDDED_REPLICAS", defaults.embedded_replicas, 0, 8),
            process_counts=tuple(
                (name, reader.integer(f"STRATA_{name.upper()}_REPLICAS", 1, 1, 16))
                for name in REPLICABLE
                if f"STRATA_{name.upper()}_REPLICAS" in env
            ),
            roles=reader.subset("STRATA_ROLES", ROLES),
            pitr_dir=env.get("STRATA_PITR_DIR", ""),
            pitr_base_backup_interval_s=reader.number(
                "STRATA_PITR_BASE_BACKUP_INTERVAL_S", defaults.pitr_base_backup_interval_s, 1.0
            ),
            pitr_keep_base_backups=reader.integer(
                "STRATA_PITR_KEEP_BASE_BACKUPS", defaults.pitr_keep_base_backups, 1, 100
            ),
            redis_url=redis_url,
            embedded_pg_port=reader.port("STRATA_EMBEDDED_PG_PORT", defaults.embedded_pg_port),
            embedded_redis_port=reader.port("STRATA_EMBEDDED_REDIS_PORT", defaults.embedded_redis_port),
            pool_min_size=reader.integer("STRATA_POOL_MIN_SIZE", defaults.pool_min_size, 0, 1000),
            pool_max_size=reader.integer("STRATA_POOL_MAX_SIZE", defaults.pool_max_size, 1, 1000),
            pool_acquire_timeout_s=reader.number(
                "STRATA_POOL_ACQUIRE_TIMEOUT_S", defaults.pool_acquire_timeout_s, 0.001
            ),
            slow_query_ms=reader.number("STRATA_SLOW_QUERY_MS", defaults.slow_query_ms, 0.0),
            stats_interval_s=reader.number("STRATA_STATS_INTERVAL_S", defaults.stats_interval_s, 0.1),
            max_message_bytes=reader.integer(
                "STRATA_MAX_MESSAGE_BYTES", defaults.max_message_bytes, 1024, 1 << 30
            ),
            max_concurrent_streams=reader.integer(
                "STRATA_MAX_CONCURRENT_STREAMS", defaults.max_concurrent_streams, 1, 1 << 20
            ),
            max_calls_in_flight=reader.integer(
                "STRATA_MAX_CALLS_IN_FLIGHT", defaults.max_calls_in_flight, 1, 1 << 24
            ),
            shutdown_grace_s=reader.number("STRATA_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s, 0.0),
            cache_local_entries=reader.integer(
                "STRATA_CACHE_LOCAL_ENTRIES", defaults.cache_local_entries, 0, 100_000_000
            ),
            cache_ttl_s=reader.number("STRATA_CACHE_TTL_S", defaults.cache_ttl_s, 0.001),
            kv_max_value_bytes=reader.integer(
                "STRATA_KV_MAX_VALUE_BYTES", defaults.kv_max_value_bytes, 1, 256 * 1024 * 1024
            ),
            kv_max_key_bytes=reader.integer("STRATA_KV_MAX_KEY_BYTES", defaults.kv_max_key_bytes, 1, 65536),
            kv_max_batch=reader.integer("STRATA_KV_MAX_BATCH", defaults.kv_max_batch, 1, 100_000),
            kv_sweep_interval_s=reader.number(
                "STRATA_KV_SWEEP_INTERVAL_S", defaults.kv_sweep_interval_s, 0.01
            ),
            kv_history_revisions=reader.integer(
                "STRATA_KV_HISTORY_REVISIONS", defaults.kv_history_revisions, 1, 1 << 62
            ),
            log_level=reader.choice(
                "STRATA_LOG_LEVEL", defaults.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            internal_secret=env.get("STRATA_INTERNAL_SECRET", ""),
            key_pepper=env.get("STRATA_KEY_PEPPER", ""),
            key_cache_ttl_s=reader.number("STRATA_KEY_CACHE_TTL_S", defaults.key_cache_ttl_s, 0.0),
            identity_max_age_s=reader.number(
                "STRATA_IDENTITY_MAX_AGE_S", defaults.identity_max_age_s, 1.0, 600.0
            ),
            rate_limit_rps=reader.number("STRATA_RATE_LIMIT_RPS", defaults.rate_limit_rps, 0.001),
            rate_limit_burst=reader.integer("STRATA_RATE_LIMIT_BURST", defaults.rate_limit_burst, 1, 1 << 30),
            auth_failures_per_peer_rps=reader.number(
                "STRATA_AUTH_FAILURES_PER_PEER_RPS", defaults.auth_failures_per_peer_rps, 0.001
            ),
            auth_failures_per_peer_burst=reader.integer(
                "STRATA_AUTH_FAILURES_PER_PEER_BURST", defaults.auth_failures_per_peer_burst, 1, 1 << 30
            ),
            streams_per_key=reader.integer("STRATA_STREAMS_PER_KEY", defaults.streams_per_key, 1, 1 << 20),
            streams_per_tenant=reader.integer(
                "STRATA_STREAMS_PER_TENANT", defaults.streams_per_tenant, 1, 1 << 20
            ),
            gateway_max_streams=reader.integer(
                "STRATA_GATEWAY_MAX_STREAMS", defaults.gateway_max_streams, 1, 1 << 20
            ),
            stream_max_age_s=reader.number("STRATA_STREAM_MAX_AGE_S", defaults.stream_max_age_s, 1.0),
            upstreams=tuple(
                (service, addresses)
                for service in ROLES
                if (addresses := reader.addresses(f"STRATA_{service.upper()}_UPSTREAMS"))
            ),
            metrics_ports=tuple(
                (name, reader.port(f"STRATA_{name.upper()}_METRICS_PORT", 1))
                for name in ROLES
                if f"STRATA_{name.upper()}_METRICS_PORT" in env
            ),
            otlp_protocol=otlp_protocol,
            tls_cert_file=reader.existing_file("STRATA_TLS_CERT_FILE"),
            tls_key_file=reader.existing_file("STRATA_TLS_KEY_FILE"),
            tls_client_ca_file=reader.existing_file("STRATA_TLS_CLIENT_CA_FILE"),
            internal_tls_ca_file=reader.existing_file("STRATA_INTERNAL_TLS_CA_FILE"),
            internal_tls_cert_file=reader.existing_file("STRATA_INTERNAL_TLS_CERT_FILE"),
            internal_tls_key_file=reader.existing_file("STRATA_INTERNAL_TLS_KEY_FILE"),
            restore_max_bytes=reader.integer(
                "STRATA_RESTORE_MAX_BYTES", defaults.restore_max_bytes, 1, 1 << 50
            ),
        )
    )


# Services that may run as several processes (admin holds the owner role: one).
REPLICABLE = ("kv", "tenants", "vector", "gateway")
# How reads are spread over replicas (see shared.storage.replicas).
READ_STRATEGIES = ("round_robin", "least_in_flight", "lowest_latency")


def _check_tls(settings: Settings) -> Settings:
    """TLS needs both cert and key; a client CA needs TLS; internal TLS needs its three files.
    Half a setting is an error, not plaintext."""
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigError("set both STRATA_TLS_CERT_FILE and STRATA_TLS_KEY_FILE, or neither")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigError("STRATA_TLS_CLIENT_CA_FILE needs STRATA_TLS_CERT_FILE and STRATA_TLS_KEY_FILE")
    internal = {
        "STRATA_INTERNAL_TLS_CA_FILE": settings.internal_tls_ca_file,
        "STRATA_INTERNAL_TLS_CERT_FILE": settings.internal_tls_cert_file,
        "STRATA_INTERNAL_TLS_KEY_FILE": settings.internal_tls_key_file,
    }
    missing = [name for name, value in internal.items() if not value]
    if missing and len(missing) < len(internal):
        raise ConfigError(f"internal TLS needs all of {', '.join(internal)}: {', '.join(missing)} not set")
    return settings


def require_internal_secret(settings: Settings) -> bytes:
    """The shared gateway/service secret; ConfigError when it is not set."""
    if len(settings.internal_secret) < 16:
        raise ConfigError(
            "STRATA_INTERNAL_SECRET must be set (16+ characters) and shared by gateway and services"
        )
    return settings.internal_secret.encode()


# The samplers the SDK's TracerProvider builds from OTEL_TRACES_SAMPLER (it
# falls back to parentbased_always_on, with a warning, for any other name).
OTEL_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
# What shared.observability.telemetry can export with: OTLP over gRPC or HTTP (protobuf), or nothing.
OTEL_EXPORTERS = ("otlp", "none")
OTEL_PROTOCOLS = ("grpc", "http/protobuf")


def _check_otel(reader: EnvReader) -> str:
    """Check the standard ``OTEL_*`` variables Strata relies on; the OTLP traces protocol.

    The traces protocol overrides the general one; a blank one is unset. The
    exporters do not read these variables: telemetry exports with this answer.
    """
    reader.choice("OTEL_SDK_DISABLED", "false", ("true", "false"))
    reader.choice("OTEL_TRACES_EXPORTER", "otlp", OTEL_EXPORTERS)
    protocol = reader.choice("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", OTEL_PROTOCOLS)
    protocol = reader.choice("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol, OTEL_PROTOCOLS)
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        reader.url(name, lambda url: endpoint_problem(url, scheme_required=protocol != "grpc"))
    sampler = reader.choice("OTEL_TRACES_SAMPLER", "parentbased_always_on", OTEL_SAMPLERS)
    if sampler in _RATIO_SAMPLERS:
        reader.number("OTEL_TRACES_SAMPLER_ARG", 1.0, 0.0, 1.0)
    return protocol

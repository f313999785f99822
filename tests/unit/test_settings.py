"""shared.config.settings: defaults, every override, and a ConfigError naming each bad variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.config.settings import ConfigError, Settings, load_settings

PG = "postgresql://u:p@db.example:5432/strata"
REDIS = "redis://cache.example:6379/0"


def test_empty_environment_gives_the_defaults():
    assert load_settings({}) == Settings()


def test_defaults_are_embedded_mode():
    settings = load_settings({})
    assert settings.embedded
    assert settings.database_url == ""
    assert settings.redis_url == ""
    assert settings.data_dir == Path(".strata")
    assert settings.kv_port == 50061


def test_without_an_argument_the_process_environment_is_read(monkeypatch):
    monkeypatch.setenv("STRATA_KV_PORT", "41234")
    assert load_settings().kv_port == 41234


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("STRATA_DATA_DIR", "/tmp/strata-x", "data_dir", Path("/tmp/strata-x")),
        ("STRATA_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("STRATA_GATEWAY_PORT", "1", "gateway_port", 1),
        ("STRATA_KV_PORT", "65535", "kv_port", 65535),
        ("STRATA_TENANTS_PORT", "40001", "tenants_port", 40001),
        ("STRATA_VECTOR_PORT", "40002", "vector_port", 40002),
        ("STRATA_ADMIN_PORT", "40003", "admin_port", 40003),
        ("STRATA_EMBEDDED_PG_PORT", "40004", "embedded_pg_port", 40004),
        ("STRATA_EMBEDDED_REDIS_PORT", "40005", "embedded_redis_port", 40005),
        ("STRATA_POOL_MIN_SIZE", "0", "pool_min_size", 0),
        ("STRATA_POOL_MAX_SIZE", "1000", "pool_max_size", 1000),
        ("STRATA_SLOW_QUERY_MS", "12.5", "slow_query_ms", 12.5),
        ("STRATA_MAX_MESSAGE_BYTES", "1024", "max_message_bytes", 1024),
        ("STRATA_SHUTDOWN_GRACE_S", "0", "shutdown_grace_s", 0.0),
        ("STRATA_CACHE_LOCAL_ENTRIES", "0", "cache_local_entries", 0),
        ("STRATA_CACHE_TTL_S", "0.001", "cache_ttl_s", 0.001),
        ("STRATA_KV_MAX_VALUE_BYTES", "2048", "kv_max_value_bytes", 2048),
        ("STRATA_KV_MAX_KEY_BYTES", "65536", "kv_max_key_bytes", 65536),
        ("STRATA_KV_MAX_BATCH", "7", "kv_max_batch", 7),
        ("STRATA_KV_SWEEP_INTERVAL_S", "0.25", "kv_sweep_interval_s", 0.25),
        ("STRATA_KV_HISTORY_REVISIONS", "1", "kv_history_revisions", 1),
        ("STRATA_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        (
            "DATABASE_READ_URLS",
            " postgresql://r1/db , ,postgresql://r2/db",
            "database_read_urls",
            ("postgresql://r1/db", "postgresql://r2/db"),
        ),
        ("STRATA_READ_STRATEGY", "round_robin", "read_strategy", "round_robin"),
        ("STRATA_READ_STRATEGY", "LOWEST_LATENCY", "read_strategy", "lowest_latency"),
        ("STRATA_REPLICA_MAX_LAG_BYTES", "0", "replica_max_lag_bytes", 0),
        ("STRATA_REPLICA_MAX_LAG_S", "0.5", "replica_max_lag_s", 0.5),
        ("STRATA_REPLICA_PROBE_INTERVAL_S", "0.1", "replica_probe_interval_s", 0.1),
        ("STRATA_REPLICA_FAILURES_TO_OPEN", "1", "replica_failures_to_open", 1),
        ("STRATA_REPLICA_OPEN_S", "0.25", "replica_open_s", 0.25),
        ("STRATA_EMBEDDED_REPLICAS", "2", "embedded_replicas", 2),
        ("STRATA_KV_REPLICAS", "3", "process_counts", (("kv", 3),)),
        ("STRATA_GATEWAY_REPLICAS", "2", "process_counts", (("gateway", 2),)),
        ("STRATA_PITR_DIR", "/srv/pitr", "pitr_dir", "/srv/pitr"),
        ("STRATA_PITR_BASE_BACKUP_INTERVAL_S", "60", "pitr_base_backup_interval_s", 60.0),
        ("STRATA_PITR_KEEP_BASE_BACKUPS", "5", "pitr_keep_base_backups", 5),
    ],
)
def test_each_variable_overrides_its_setting(variable, raw, attribute, expected):
    settings = load_settings({variable: raw})
    assert getattr(settings, attribute) == expected
    # Nothing else moved.
    others = {name: getattr(Settings(), name) for name in Settings.__slots__ if name != attribute}
    assert {name: getattr(settings, name) for name in others} == others


def test_surrounding_whitespace_is_ignored():
    assert load_settings({"STRATA_KV_PORT": "  41000\n"}).kv_port == 41000


def test_a_blank_value_means_the_default():
    assert load_settings({"STRATA_KV_PORT": "   ", "STRATA_SLOW_QUERY_MS": ""}) == Settings()


def test_both_urls_select_external_mode():
    settings = load_settings({"DATABASE_URL": PG, "REDIS_URL": REDIS})
    assert not settings.embedded
    assert settings.database_url == PG
    assert settings.redis_url == REDIS


def test_migrate_url_defaults_to_the_database_url():
    settings = load_settings({"DATABASE_URL": PG, "REDIS_URL": REDIS})
    assert settings.migrate_database_url == PG


def test_migrate_url_overrides_the_database_url_for_migrations():
    owner = "postgres://owner:secret@db.example/strata"
    settings = load_settings({"DATABASE_URL": PG, "REDIS_URL": REDIS, "STRATA_MIGRATE_DATABASE_URL": owner})
    assert settings.migrate_database_url == owner
    assert settings.database_url == PG


@pytest.mark.parametrize("redis_url", ["redis://h:1/0", "rediss://h:1/0", "unix:///tmp/redis.sock"])
def test_every_redis_scheme_is_accepted(redis_url):
    assert load_settings({"DATABASE_URL": PG, "REDIS_URL": redis_url}).redis_url == redis_url


@pytest.mark.parametrize(
    "variable",
    [
        "STRATA_GATEWAY_PORT",
        "STRATA_KV_PORT",
        "STRATA_TENANTS_PORT",
        "STRATA_VECTOR_PORT",
        "STRATA_ADMIN_PORT",
        "STRATA_EMBEDDED_PG_PORT",
        "STRATA_EMBEDDED_REDIS_PORT",
    ],
)
@pytest.mark.parametrize("raw", ["abc", "0", "65536", "-1", "80.5"])
def test_a_bad_port_is_a_config_error_naming_the_variable(variable, raw):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: raw})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("STRATA_POOL_MAX_SIZE", "ten"),
        ("STRATA_POOL_MAX_SIZE", "0"),
        ("STRATA_POOL_MIN_SIZE", "-1"),
        ("STRATA_MAX_MESSAGE_BYTES", "1023"),
        ("STRATA_KV_MAX_BATCH", "100001"),
        ("STRATA_KV_MAX_KEY_BYTES", "1e3"),
        ("STRATA_CACHE_LOCAL_ENTRIES", "many"),
        ("STRATA_EMBEDDED_REPLICAS", "9"),
        ("STRATA_KV_REPLICAS", "0"),
        ("STRATA_GATEWAY_REPLICAS", "17"),
        ("STRATA_REPLICA_FAILURES_TO_OPEN", "0"),
    ],
)
def test_a_bad_integer_is_a_config_error_naming_the_variable(variable, raw):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: raw})


@pytest.mark.parametrize(
    "variable",
    ["STRATA_SLOW_QUERY_MS", "STRATA_SHUTDOWN_GRACE_S", "STRATA_CACHE_TTL_S", "STRATA_KV_SWEEP_INTERVAL_S"],
)
@pytest.mark.parametrize("raw", ["nan", "NaN", "-nan"])
def test_a_nan_number_is_a_config_error_naming_the_variable(variable, raw):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: raw})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("STRATA_SLOW_QUERY_MS", "fast"),
        ("STRATA_SLOW_QUERY_MS", "-1"),
        ("STRATA_SHUTDOWN_GRACE_S", "-0.5"),
        ("STRATA_CACHE_TTL_S", "0"),
        ("STRATA_KV_SWEEP_INTERVAL_S", "0.001"),
    ],
)
def test_a_bad_or_too_small_number_is_a_config_error_naming_the_variable(variable, raw):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: raw})


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "mysql://u@h/db", "REDIS_URL": REDIS}, "DATABASE_URL"),
        ({"DATABASE_URL": "db.example:5432", "REDIS_URL": REDIS}, "DATABASE_URL"),
        ({"DATABASE_URL": PG, "REDIS_URL": "http://cache.example"}, "REDIS_URL"),
        ({"DATABASE_URL": PG, "REDIS_URL": REDIS, "STRATA_MIGRATE_DATABASE_URL": "redis://x"}, "MIGRATE"),
        ({"DATABASE_URL": PG, "REDIS_URL": REDIS, "DATABASE_READ_URLS": f"{PG},replica:5432"}, "READ_URLS"),
    ],
)
def test_a_bad_url_scheme_is_a_config_error_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load_settings(env)


@pytest.mark.parametrize("env", [{"DATABASE_URL": PG}, {"REDIS_URL": REDIS}])
def test_only_one_of_the_urls_is_a_config_error_naming_both(env):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert "DATABASE_URL" in str(caught.value)
    assert "REDIS_URL" in str(caught.value)


def test_process_counts_default_to_one_and_admin_is_never_replicated():
    settings = load_settings({"STRATA_VECTOR_REPLICAS": "4", "STRATA_ADMIN_REPLICAS": "1"})
    assert settings.processes_of("vector") == 4
    assert settings.processes_of("kv") == settings.processes_of("admin") == 1
    with pytest.raises(ConfigError, match="STRATA_ADMIN_REPLICAS"):
        load_settings({"STRATA_ADMIN_REPLICAS": "2"})


def test_an_unknown_read_strategy_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="STRATA_READ_STRATEGY"):
        load_settings({"STRATA_READ_STRATEGY": "random"})


def test_an_unknown_log_level_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="STRATA_LOG_LEVEL"):
        load_settings({"STRATA_LOG_LEVEL": "verbose"})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_port_of_returns_the_service_port():
    settings = load_settings({"STRATA_KV_PORT": "41001", "STRATA_GATEWAY_PORT": "41002"})
    assert settings.port_of("kv") == 41001
    assert settings.port_of("gateway") == 41002


def test_port_of_an_unknown_service_is_a_config_error():
    with pytest.raises(ConfigError, match="nosuch"):
        Settings().port_of("nosuch")


@pytest.mark.parametrize("variable", ["STRATA_CACHE_TTL_S", "STRATA_SHUTDOWN_GRACE_S"])
def test_an_infinite_number_is_a_config_error_naming_the_variable(variable):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: "inf"})


# -- server URLs: checked in full, the password never echoed -------------------------

SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    "url",
    [
        PG,
        "postgres://u@127.0.0.1/strata",
        "postgresql:///strata",  # no host: the local socket, as with libpq
        "postgresql://%2Fvar%2Frun%2Fpostgresql/strata",
        "postgresql://u:p%40ss@h1:5432,h2:5433/strata?sslmode=require&connect_timeout=3",
        "postgresql://u@[::1]:5432/strata",
        "postgresql://u@db_primary/strata?port=6432",
    ],
)
def test_a_well_formed_postgres_url_is_accepted(url):
    assert load_settings({"DATABASE_URL": url, "REDIS_URL": REDIS}).database_url == url


@pytest.mark.parametrize(
    "url",
    [
        f"postgres://u:{SECRET}@127.0.0.1:notaport/db",
        f"postgres://u:{SECRET}@127.0.0.1:0/db",
        f"postgres://u:{SECRET}@127.0.0.1:65536/db",
        f"postgres://u:{SECRET}@h1:5432,/db",
        f"postgres://u:{SECRET}@[::1/db",
        f"postgres://u:{SECRET}@[not-ipv6]:5432/db",
        f"postgres://u:{SECRET}@bad host/db",
        f"postgres://u:{SECRET}@h/db?port=five",
        f"postgres://u:{SECRET}@h/db?sslmode=sometimes",
        f"postgres://u:{SECRET}@x@h/db",  # an unencoded '@' in the password
        f"postgres://u:{SECRET}/db",  # no '@': the password reads as a port
        f"mysql://u:{SECRET}@h/db",
    ],
)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "STRATA_MIGRATE_DATABASE_URL", "DATABASE_READ_URLS"])
def test_a_malformed_postgres_url_is_a_config_error_naming_the_variable_not_the_password(variable, url):
    env = {"DATABASE_URL": PG, "REDIS_URL": REDIS, variable: url}
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings(env)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        REDIS,
        "rediss://:pw@cache.example:6380",
        "redis://[::1]:6379/2",
        "unix:///run/redis/redis.sock?db=1",
        "redis+cluster://:pw@10.0.0.1:6379,10.0.0.2:6379",
        "rediss+cluster://:pw@node-a:7000",
    ],
)
def test_a_well_formed_redis_url_is_accepted(url):
    assert load_settings({"DATABASE_URL": PG, "REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@cache.example:notaport/0",
        f"redis://:{SECRET}@cache.example:70000/0",
        f"redis://:{SECRET}@/0",
        f"redis://:{SECRET}@cache.example:6379/zero",
        f"redis://:{SECRET}@h1:6379,h2:6379/0",  # several hosts need redis+cluster://
        f"redis+cluster://:{SECRET}@10.0.0.1:6379,10.0.0.2:x",
        f"redis+cluster://:{SECRET}@10.0.0.1:6379,,",
        "unix://",
        f"http://:{SECRET}@cache.example",
    ],
)
def test_a_malformed_redis_url_is_a_config_error_naming_the_variable_not_the_password(url):
    with pytest.raises(ConfigError, match="REDIS_URL") as caught:
        load_settings({"DATABASE_URL": PG, "REDIS_URL": url})
    assert SECRET not in str(caught.value)


# -- the standard OTEL_* variables Strata relies on ----------------------------------


@pytest.mark.parametrize(
    ("env", "protocol"),
    [
        ({}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "HTTP/PROTOBUF"},
            "http/protobuf",
        ),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": " "},
            "http/protobuf",
        ),
    ],
)
def test_the_traces_protocol_overrides_the_general_one_and_a_blank_one_is_unset(env, protocol):
    assert load_settings(env).otlp_protocol == protocol


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel:4318"},
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "HTTP/PROTOBUF"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"},  # the gRPC exporter takes host:port
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_SDK_DISABLED": "TRUE"},
        {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
        {"OTEL_TRACES_SAMPLER": "traceidratio"},  # no argument: the SDK's 1.0
        {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "ignored"},
    ],
)
def test_good_otel_values_are_accepted(env):
    # The protocol is the one setting they change (see the test above).
    loaded = load_settings(env)
    assert loaded == dataclasses.replace(Settings(), otlp_protocol=loaded.otlp_protocol)
    assert loaded.otlp_protocol in ("grpc", "http/protobuf")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
        ({"OTEL_TRACES_SAMPLER": "bogus"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "-0.1"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://otel:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:port"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://:4317"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "otel:4318"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ],
)
def test_a_bad_otel_value_is_a_config_error_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=rf"^{variable}\b"):
        load_settings(env)


def test_roles_are_all_by_default_or_those_named_in_the_order_they_start():
    assert load_settings({}).roles == ("kv", "tenants", "vector", "admin", "gateway")
    assert load_settings({"STRATA_ROLES": "ALL"}).roles == load_settings({}).roles
    assert load_settings({"STRATA_ROLES": " gateway , KV "}).roles == ("kv", "gateway")


@pytest.mark.parametrize("value", ["kv,nope", "kv,kv", "kv,,vector", ","])
def test_an_unknown_repeated_or_empty_role_names_strata_roles(value):
    with pytest.raises(ConfigError, match="STRATA_ROLES"):
        load_settings({"STRATA_ROLES": value})

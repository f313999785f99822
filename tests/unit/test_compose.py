"""docker-compose.yml cannot run here (no Docker engine); check it against the code instead."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

from devstack.launcher import SERVICES
from gateway.routes import ROUTED_SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SETTINGS_SOURCE = (ROOT / "shared" / "config" / "settings.py").read_text()
CONTAINERS = COMPOSE["services"]
STRATA = {name: spec for name, spec in CONTAINERS.items() if "build" in spec}


def env_of(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in STRATA[name]["environment"].items()}


def test_every_process_the_launcher_starts_has_a_container():
    assert set(SERVICES) <= set(STRATA)


def test_every_strata_container_runs_a_module_that_exists():
    for name, spec in STRATA.items():
        command = spec["command"]
        assert command[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"
        if name in SERVICES:
            assert command[2] == SERVICES[name], (
                f"{name} runs {command[2]}, the launcher runs {SERVICES[name]}"
            )


def test_every_environment_variable_is_a_setting_the_code_reads():
    for name in STRATA:
        for variable in env_of(name):
            if variable.startswith("OTEL_"):
                continue  # read by the OpenTelemetry SDK
            if variable.endswith("_UPSTREAMS"):
                # Read as STRATA_<SERVICE>_UPSTREAMS for each routed service and the gateway.
                process = variable.removeprefix("STRATA_").removesuffix("_UPSTREAMS").lower()
                assert process in (*ROUTED_SERVICES, "gateway"), variable
            else:
                assert f'"{variable}"' in SETTINGS_SOURCE, (
                    f"{name}: {variable} is not read by shared/config/settings.py"
                )


def test_each_service_listens_where_the_gateway_looks_and_is_health_checked():
    gateway = env_of("gateway")
    for upstream in ROUTED_SERVICES:
        host, port = gateway[f"STRATA_{upstream.upper()}_UPSTREAMS"].split(":")
        assert host in STRATA, f"the gateway points at {host}, which is no container"
        assert env_of(host)[f"STRATA_{upstream.upper()}_PORT"] == port
        assert port in " ".join(STRATA[host]["healthcheck"]["test"])
        assert STRATA["gateway"]["depends_on"][host]["condition"] == "service_healthy"


def test_gateway_and_services_share_the_internal_secret_and_admin_has_a_pepper():
    secrets = {env_of(name).get("STRATA_INTERNAL_SECRET") for name in SERVICES}
    assert len(secrets) == 1 and len(secrets.pop() or "") >= 16
    assert len(env_of("admin")["STRATA_KEY_PEPPER"]) >= 16


def test_only_the_gateway_publishes_a_port():
    published = {name for name, spec in STRATA.items() if spec.get("ports")}
    assert published == {"gateway"}
    port = env_of("gateway")["STRATA_GATEWAY_PORT"]
    assert f"127.0.0.1:{port}:{port}" in STRATA["gateway"]["ports"]


def test_every_published_port_is_on_loopback_only():
    for name, spec in CONTAINERS.items():
        for mapping in spec.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} on every interface"


REQUIRED = re.compile(r"\$\{(STRATA_[A-Z_]+):\?[^}]+\}")


def test_no_secret_has_a_default_compose_refuses_to_start_without_each():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text
    required = set(REQUIRED.findall(text))
    assert required == {
        "STRATA_PG_OWNER_PASSWORD",
        "STRATA_PG_SERVICE_PASSWORD",
        "STRATA_REDIS_PASSWORD",
        "STRATA_INTERNAL_SECRET",
        "STRATA_KEY_PEPPER",
    }
    # Every secret and every URL's password is one of them, never a literal.
    for name, spec in CONTAINERS.items():
        for key, value in (spec.get("environment") or {}).items():
            value = str(value)
            if any(word in key for word in ("PASSWORD", "SECRET", "PEPPER", "AUTH")):
                assert REQUIRED.fullmatch(value), (name, key)
            if "://" in value and "@" in value:
                userinfo = value.split("://", 1)[1].rsplit("@", 1)[0]
                assert REQUIRED.search(userinfo), (name, key)


def test_redis_requires_its_password_and_every_url_carries_it():
    redis = CONTAINERS["redis"]
    command = redis["command"]
    assert (
        command[command.index("--requirepass") + 1]
        == "${STRATA_REDIS_PASSWORD:?set STRATA_REDIS_PASSWORD (README, Deployment)}"
    )
    for name in SERVICES:
        assert env_of(name)["REDIS_URL"].startswith("redis://:${STRATA_REDIS_PASSWORD:?")


def test_start_order_follows_dependencies():
    assert STRATA["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("kv", "tenants", "vector", "admin"):
        assert STRATA[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis"):
        assert "healthcheck" in CONTAINERS[name]


def test_services_send_traces_to_the_tracing_backend():
    for name in SERVICES:
        assert env_of(name)["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:")
        assert env_of(name)["OTEL_SERVICE_NAME"] == f"strata-{name}"


def test_the_image_copies_every_package_the_commands_import():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("protos", "shared", "services", "gateway", "roles"):
        assert f"COPY {folder} ./{folder}" in dockerfile
    # The dev stack (launcher, embedded servers) is never part of a deployment.
    assert "devstack" not in [
        word for line in dockerfile.splitlines() if line.startswith("COPY") for word in line.split()
    ]


def test_admin_checks_every_process_where_it_runs():
    admin = env_of("admin")
    for process in (*ROUTED_SERVICES, "gateway"):
        host, port = admin[f"STRATA_{process.upper()}_UPSTREAMS"].split(":")
        container = "admin" if host == "127.0.0.1" else host
        assert container == process, f"admin looks for {process} at {host}"
        assert env_of(container)[f"STRATA_{process.upper()}_PORT"] == port


def test_the_replica_streams_from_the_primary_and_the_services_read_from_it():
    replica = CONTAINERS["postgres-replica"]
    script = replica["command"][0]
    assert "pg_basebackup -h postgres" in script and " -R " in script and "-S strata_replica_1" in script
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    hba = COMPOSE["configs"]["pg_hba"]["content"]
    assert "host replication all all scram-sha-256" in hba
    assert "hba_file=/etc/strata/pg_hba.conf" in CONTAINERS["postgres"]["command"]
    for name in SERVICES:
        reads = env_of(name)["DATABASE_READ_URLS"]
        assert "@postgres-replica:5432/strata" in reads
        # The replica is a copy: the same service role and password as the primary's URL.
        assert reads.replace("postgres-replica", "postgres") == env_of(name)["DATABASE_URL"]


INTERNAL_TLS = {
    "STRATA_INTERNAL_TLS_CA_FILE": "internal_ca",
    "STRATA_INTERNAL_TLS_CERT_FILE": "internal_cert",
    "STRATA_INTERNAL_TLS_KEY_FILE": "internal_key",
}


def test_every_strata_process_speaks_mutual_tls_on_the_internal_hop():
    for name, spec in STRATA.items():
        env = env_of(name)
        for variable, secret in INTERNAL_TLS.items():
            assert env[variable] == f"/run/secrets/{secret}", (name, variable)
            assert secret in spec["secrets"], (name, secret)
    # The files are made by the script, kept out of git; compose refuses to start without them.
    for secret in INTERNAL_TLS.values():
        path = COMPOSE["secrets"][secret]["file"]
        assert path.startswith("./deploy/certs/"), path
    assert "deploy/certs/" in (ROOT / ".gitignore").read_text().split()


def test_the_internal_certificate_names_every_host_the_processes_call():
    script = (ROOT / "deploy" / "internal-certs.sh").read_text()
    names = set(re.findall(r"DNS:([a-z]+)", script))
    for name in STRATA:
        for variable, value in env_of(name).items():
            if variable.endswith("_UPSTREAMS"):
                for address in value.split(","):
                    host = address.rsplit(":", 1)[0]
                    assert host in names or host == "127.0.0.1", (name, variable, host)


def test_health_checks_call_services_with_the_internal_certificate_and_the_gateway_as_clients_do():
    for name in SERVICES:
        test = STRATA[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "shared.rpc.healthcheck"], name
        assert ("--gateway" in test) == (name == "gateway"), name

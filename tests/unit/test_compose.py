"""docker-compose.yml cannot run here (no Docker engine); check it against the code instead."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SETTINGS_SOURCE = (ROOT / "shared" / "settings.py").read_text()
STRATA_SERVICES = {name: spec for name, spec in COMPOSE["services"].items() if "build" in spec}


def test_every_strata_container_runs_a_module_that_exists():
    assert {"migrate", "kv"} <= set(STRATA_SERVICES)
    for name, spec in STRATA_SERVICES.items():
        command = spec["command"]
        assert command[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"


def test_every_environment_variable_is_a_setting_the_code_reads():
    for name, spec in STRATA_SERVICES.items():
        for variable in spec["environment"]:
            if variable.startswith("OTEL_"):
                continue  # read by the OpenTelemetry SDK
            assert f'"{variable}"' in SETTINGS_SOURCE, f"{name}: {variable} is not read by shared/settings.py"


def test_services_wait_for_what_they_need():
    assert STRATA_SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert STRATA_SERVICES["kv"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis"):
        assert "healthcheck" in COMPOSE["services"][name]


def test_published_ports_match_the_port_settings():
    kv = STRATA_SERVICES["kv"]
    port = kv["environment"]["STRATA_KV_PORT"]
    assert f"{port}:{port}" in kv["ports"]
    assert port in " ".join(kv["healthcheck"]["test"])


def test_the_image_copies_every_package_the_commands_import():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("protos", "shared", "services", "gateway"):
        assert f"COPY {folder} ./{folder}" in dockerfile

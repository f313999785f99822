"""A bad server URL or OTEL_* value stops `make run`'s launcher (and a lone service) at start.

Exit code 2, one line naming the variable, no traceback, no password.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import run_to_exit

pytestmark = pytest.mark.e2e

SECRET = "s3cret-pw"
GOOD = {
    "DATABASE_URL": f"postgresql://strata:{SECRET}@127.0.0.1:5432/strata",
    "REDIS_URL": f"redis://:{SECRET}@127.0.0.1:6379/0",
}


def start(module: str, data_dir: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module`` with ``settings`` on top of the good ones; it should not get far."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STRATA_", "OTEL_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(GOOD, STRATA_DATA_DIR=str(data_dir), **settings)
    return run_to_exit(module, env)


def assert_refused(result: subprocess.CompletedProcess[str], variable: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "configuration error" in result.stderr and variable in result.stderr, output
    assert "Traceback" not in output, output
    assert SECRET not in output, output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", f"postgres://u:{SECRET}@127.0.0.1:notaport/db"),
        ("DATABASE_URL", f"postgres://u:{SECRET}@bad@host/db"),
        ("STRATA_MIGRATE_DATABASE_URL", f"postgres://owner:{SECRET}@127.0.0.1:99999/db"),
        ("DATABASE_READ_URLS", f"postgres://u:{SECRET}@replica:port/db"),
        ("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:notaport/0"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "bogus"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_SAMPLER", "bogus"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
    ],
)
def test_the_launcher_exits_with_code_2_naming_the_variable(tmp_path, variable, value):
    extra = {"OTEL_TRACES_SAMPLER": "traceidratio"} if variable == "OTEL_TRACES_SAMPLER_ARG" else {}
    result = start("devstack.launcher", tmp_path, **{variable: value}, **extra)
    assert_refused(result, variable)
    assert "Strata: starting" not in result.stdout
    assert not any(tmp_path.iterdir()), "the launcher wrote to its data folder before refusing"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", f"postgres://u:{SECRET}@127.0.0.1:notaport/db"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
    ],
)
def test_a_lone_service_exits_with_code_2_naming_the_variable(tmp_path, variable, value):
    assert_refused(start("services.kv", tmp_path, **{variable: value}), variable)

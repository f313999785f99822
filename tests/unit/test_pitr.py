"""The WAL archive's command and its pruning, on plain files (no server)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from devstack.pitr import PitrFolder, recovery_time
from devstack.postgres import archive_command

SEGMENT = "000000010000000000000003"


def archive(command: str, pgdata: Path, name: str) -> int:
    """Run ``command`` as Postgres would for segment ``name`` of ``pgdata``: its exit code."""
    expanded = command.replace("%p", f"pg_wal/{name}").replace("%f", name).replace("%%", "%")
    return subprocess.run(["sh", "-c", expanded], cwd=pgdata, capture_output=True).returncode


def segment(pgdata: Path, name: str, content: bytes) -> None:
    (pgdata / "pg_wal").mkdir(parents=True, exist_ok=True)
    (pgdata / "pg_wal" / name).write_bytes(content)


def test_a_segment_is_copied_whole_under_its_name(tmp_path):
    pgdata, wal = tmp_path / "pg", tmp_path / "odd 'name' 100%" / "wal"
    wal.mkdir(parents=True)
    segment(pgdata, SEGMENT, b"one")
    assert archive(archive_command(wal), pgdata, SEGMENT) == 0
    assert [p.name for p in wal.iterdir()] == [SEGMENT]
    assert (wal / SEGMENT).read_bytes() == b"one"


def test_archiving_again_is_accepted_only_for_the_same_bytes(tmp_path):
    pgdata, wal = tmp_path / "pg", tmp_path / "wal"
    wal.mkdir()
    segment(pgdata, SEGMENT, b"one")
    assert archive(archive_command(wal), pgdata, SEGMENT) == 0
    assert archive(archive_command(wal), pgdata, SEGMENT) == 0, "a retry after a crash"
    segment(pgdata, SEGMENT, b"another cluster's")
    assert archive(archive_command(wal), pgdata, SEGMENT) != 0
    assert (wal / SEGMENT).read_bytes() == b"one", "never overwritten"


def test_without_the_archive_folder_segments_are_let_go(tmp_path):
    pgdata, wal = tmp_path / "pg", tmp_path / "pitr" / "wal"
    segment(pgdata, SEGMENT, b"one")
    assert archive(archive_command(wal), pgdata, SEGMENT) == 0
    assert not wal.exists()


def make_backup(pitr: PitrFolder, finished: datetime, start: str) -> None:
    path = pitr.base / finished.strftime("%Y%m%dT%H%M%S.%fZ")
    path.mkdir(parents=True)
    (path / "backup_label").write_text(
        f"START WAL LOCATION: 0/{start[-2:]}000028 (file {start})\nCHECKPOINT LOCATION: 0/1\n"
    )


def test_pruning_keeps_the_newest_backups_and_the_wal_they_need(tmp_path):
    pitr = PitrFolder(tmp_path / "pitr")
    pitr.wal.mkdir(parents=True)
    now = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    for hours, start in (
        (3, "000000010000000000000002"),
        (2, "000000010000000000000005"),
        (1, "00000001000000000000000A"),
    ):
        make_backup(pitr, now - timedelta(hours=hours), start)
    names = [
        "000000010000000000000004",
        "000000010000000000000004.part",
        "000000010000000000000002.00000028.backup",
        "000000010000000000000005",
        "000000010000000000000005.00000028.backup",
        "000000010000000000000006",
        "00000002.history",
    ]
    for name in names:
        (pitr.wal / name).write_bytes(b"x")
    (pitr.base / "20250102T040000.000000Z.partial").mkdir()

    removed, segments = pitr.prune(keep=2)

    assert removed == [(now - timedelta(hours=3)).strftime("%Y%m%dT%H%M%S.%fZ")]
    assert segments == 3
    assert sorted(p.name for p in pitr.wal.iterdir()) == [
        "000000010000000000000005",
        "000000010000000000000005.00000028.backup",
        "000000010000000000000006",
        "00000002.history",
    ]
    backups = pitr.base_backups()
    assert [b.start_segment for b in backups] == ["000000010000000000000005", "00000001000000000000000A"]
    assert backups[0].finish_time == now - timedelta(hours=2)
    assert pitr.newest_segment() is not None and pitr.newest_segment()[0] == "000000010000000000000006"


def test_recovery_times_are_utc_to_the_microsecond():
    moment = datetime(2025, 6, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert recovery_time(moment) == "2025-06-01 12:00:00.123456+00"

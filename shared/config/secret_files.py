"""Generated secrets kept as files (mode 0600) in a 0700 folder of the data directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["stored_secret"]


def stored_secret(folder: Path, name: str) -> str:
    """The secret ``name`` under ``folder``, generated on first use and kept across restarts."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip()

"""Branch names, the databases they map to, and the errors that name a branch."""

from __future__ import annotations

import re

from shared.api.errors import FieldViolation, StrataError, already_exists, invalid_argument, not_found

__all__ = ["DATABASE_PREFIX", "checked_name", "name_taken", "no_branch"]

DATABASE_PREFIX = "strata_branch_"  # keeps branches apart from every other database of the cluster
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def checked_name(name: str, field: str) -> str:
    """``name`` if it is a valid branch name, else INVALID_ARGUMENT on ``field``."""
    if not _NAME_RE.fullmatch(name):
        raise invalid_argument(
            [FieldViolation(field, "must be 1-48 characters of [a-z0-9_], starting with a letter")],
        )
    return name


def name_taken(name: str) -> StrataError:
    """ALREADY_EXISTS for the branch ``name``."""
    return already_exists(
        "BRANCH_ALREADY_EXISTS",
        f"a branch named {name!r} already exists",
        name=name,
    )


def no_branch(name: str) -> StrataError:
    """NOT_FOUND for the branch ``name``."""
    return not_found("BRANCH_NOT_FOUND", f"no branch named {name!r}", name=name)

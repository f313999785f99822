"""Point-in-time recovery where the Postgres server is the provider's (``DATABASE_URL``).

Strata archives WAL and makes branches at a time only for the server it runs
itself (:mod:`.pitr`, embedded mode); everywhere else those calls answer
FAILED_PRECONDITION ``PITR_NOT_MANAGED``, and branches are listed as they are.
"""

from __future__ import annotations

from strata.admin.v1 import admin_pb2

from services.admin.branches.mapping import branch_message
from services.admin.branches.registry import BranchRow
from shared.api.errors import Code, StrataError
from shared.rpc.handlers import Context

__all__ = ["NoPointInTime"]


class NoPointInTime:
    """The point-in-time calls where this deployment does not run its Postgres server."""

    async def recovery_window(self, context: Context) -> admin_pb2.GetRecoveryWindowResponse:
        """FAILED_PRECONDITION ``PITR_NOT_MANAGED``."""
        raise _not_managed()

    async def create_branch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        """FAILED_PRECONDITION ``PITR_NOT_MANAGED``."""
        raise _not_managed()

    async def delete_branch(self, row: BranchRow, context: Context) -> None:
        """FAILED_PRECONDITION ``PITR_NOT_MANAGED`` (a point-in-time branch left by embedded mode)."""
        raise _not_managed()

    async def describe(self, rows: list[BranchRow]) -> list[admin_pb2.Branch]:
        """Registry rows as Branch messages."""
        return [branch_message(row) for row in rows]


def _not_managed() -> StrataError:
    return StrataError(
        Code.FAILED_PRECONDITION,
        "PITR_NOT_MANAGED",
        "point-in-time recovery belongs to the provider of the Postgres server (DATABASE_URL): "
        "Strata archives WAL and branches at a time only the server it runs (embedded mode)",
    )

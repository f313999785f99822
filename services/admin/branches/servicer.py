"""The backup and branch calls of ``strata.admin.v1.AdminService``: each needs the ``operator``
scope and is answered by :class:`.backups.Backups` (point-in-time ones by :mod:`.pitr`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from strata.admin.v1 import admin_pb2

from services.admin.branches.backups import Backups
from shared.rpc.handlers import Context

__all__ = ["BranchServicer"]


class BranchServicer:
    """Backup, Restore, CreateBranch, ListBranches, DeleteBranch and GetRecoveryWindow."""

    def __init__(self, backups: Backups) -> None:
        self._backups = backups

    def Backup(
        self, request: admin_pb2.BackupRequest, context: Context
    ) -> AsyncIterator[admin_pb2.BackupResponse]:
        return self._backups.backup(request, context)

    async def Restore(
        self, requests: AsyncIterator[admin_pb2.RestoreRequest], context: Context
    ) -> admin_pb2.RestoreResponse:
        return await self._backups.restore(requests, context)

    async def CreateBranch(
        self, request: admin_pb2.CreateBranchRequest, context: Context
    ) -> admin_pb2.CreateBranchResponse:
        return await self._backups.create_branch(request, context)

    async def ListBranches(
        self, request: admin_pb2.ListBranchesRequest, context: Context
    ) -> admin_pb2.ListBranchesResponse:
        return await self._backups.list_branches(request, context)

    async def DeleteBranch(
        self, request: admin_pb2.DeleteBranchRequest, context: Context
    ) -> admin_pb2.DeleteBranchResponse:
        return await self._backups.delete_branch(request, context)

    async def GetRecoveryWindow(
        self, request: admin_pb2.GetRecoveryWindowRequest, context: Context
    ) -> admin_pb2.GetRecoveryWindowResponse:
        return await self._backups.recovery_window(request, context)

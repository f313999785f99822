"""The archive a Restore call uploads, as it streams in: checked, counted, hashed and signed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from pathlib import Path

from strata.admin.v1 import admin_pb2

from services.admin.branches.names import checked_name
from shared.api.errors import Code, FieldViolation, StrataError, invalid_argument

__all__ = ["RestoreUpload"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ARCHIVE_MAGIC = b"PGDMP"  # the first bytes of every custom-format archive
# How much of a refused upload is still read before answering (see RestoreUpload.discard_rest).
_DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
_DISCARD_LIMIT_S = 5.0


class RestoreUpload:
    """The archive a Restore call streams: its bytes in order, their count, SHA-256 and signature."""

    def __init__(
        self, requests: AsyncIterator[admin_pb2.RestoreRequest], limit: int, signing: hmac.HMAC
    ) -> None:
        self._requests = aiter(requests)
        self._limit = limit
        self._name = ""
        self._expected = ""
        self._head = b""
        self._digest = hashlib.sha256()
        self.signing = signing  # fed every byte, to compare with the signature given
        self.signature = ""
        self.total = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    async def start(self) -> str:
        """The new branch's name, once the first bytes look like a custom-format archive."""
        first = await anext(self._requests, None)
        if first is None:
            raise invalid_argument(
                [FieldViolation("database", "the stream is empty; its first message names the database")],
            )
        self._name = checked_name(first.database, "database")
        self._head = self._take(first)
        while len(self._head) < len(_ARCHIVE_MAGIC):
            message = await anext(self._requests, None)
            if message is None:
                break
            self._head += self._take(message)
        if not self._head.startswith(_ARCHIVE_MAGIC):
            raise StrataError(
                Code.INVALID_ARGUMENT,
                "NOT_A_BACKUP",
                "the stream is not a pg_dump custom-format archive (as Backup makes)",
            )
        return self._name

    async def spool(self, path: Path) -> None:
        """Write the whole archive to ``path`` (a private folder's), reading the stream to its end."""
        with path.open("wb") as file:
            await asyncio.to_thread(file.write, self._head)
            async for message in self._requests:
                await asyncio.to_thread(file.write, self._take(message))

    async def discard_rest(self) -> None:
        """Before a refusal, read (a bounded part of) what the caller is still sending.

        A grpc-python asyncio client still writing when the answer comes can
        report INTERNAL ("Internal error from Core") instead of that answer
        (grpc/grpc#36066); letting it finish first avoids this for all but
        very large uploads. The gateway relays the answer only after this.
        """
        read = 0
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DISCARD_LIMIT_S):
                async for message in self._requests:
                    read += len(message.data)
                    if read > _DISCARD_LIMIT_BYTES:
                        return

    def verify(self) -> None:
        """INVALID_ARGUMENT when the caller gave a SHA-256 the bytes do not have."""
        if self._expected and self._expected != self.sha256:
            raise StrataError(
                Code.INVALID_ARGUMENT,
                "CHECKSUM_MISMATCH",
                "the archive's SHA-256 is not the one given; nothing was kept",
                metadata={"expected": self._expected, "actual": self.sha256},
            )

    def _take(self, message: admin_pb2.RestoreRequest) -> bytes:
        if message.database and message.database != self._name:
            raise invalid_argument([FieldViolation("database", "only the first message names the database")])
        # Either may come in any message, but always the same.
        self._expected = _hex_once(message.sha256, self._expected, "sha256")
        self.signature = _hex_once(message.signature, self.signature, "signature")
        self.total += len(message.data)
        if self.total > self._limit:
            raise StrataError(
                Code.RESOURCE_EXHAUSTED,
                "RESTORE_TOO_LARGE",
                f"the archive is larger than {self._limit} bytes (STRATA_RESTORE_MAX_BYTES)",
                metadata={"limit": str(self._limit)},
            )
        self._digest.update(message.data)
        self.signing.update(message.data)
        return message.data


def _hex_once(value: str, earlier: str, field: str) -> str:
    """``value`` (64 lowercase hex characters) if given, else ``earlier``; INVALID_ARGUMENT on ``field``
    when it is malformed or differs from ``earlier``."""
    if not value:
        return earlier
    if not _SHA256_RE.fullmatch(value):
        raise invalid_argument([FieldViolation(field, "must be 64 lowercase hex characters")])
    if earlier and value != earlier:
        raise invalid_argument([FieldViolation(field, "differs from an earlier message's")])
    return value

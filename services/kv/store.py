"""The KV store's SQL: every statement the service runs, in one place.

Writes are single calls of the plpgsql functions in migrations/ (one round
trip, autocommit; puts go through a group commit, see shared/cache/groupcommit.py);
reads are plain SELECTs that never return an expired key.
Rows are turned into ``KeyValue`` messages here so the servicer deals only in
protobuf.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import asyncpg
from strata.kv.v1 import kv_pb2

from services.kv.keyspace import KeyRange
from shared.api.answers import ROW_OVERHEAD_BYTES, OverBudget, cut_by_bytes, split_at_budget
from shared.api.timestamps import to_timestamp
from shared.cache.groupcommit import GroupCommit
from shared.storage.consistency import note_commit
from shared.storage.db import Database

__all__ = ["Change", "ChangesPage", "DeleteResult", "KvStore", "PutItem", "WriteResult"]

_log = logging.getLogger(__name__)

_LIVE = "(expires_at IS NULL OR expires_at > clock_timestamp())"
_ENTRY_COLUMNS = "key, value, content_type, create_revision, mod_revision, version, expires_at"


def _entry_bytes(namespace: str, *, with_value: bool = True) -> str:
    """SQL for what an entry adds to an answer (shared.api.answers): key, value, content type, and the
    namespace each entry of the answer repeats."""
    size = f"octet_length(key) + octet_length(content_type) + {ROW_OVERHEAD_BYTES + len(namespace.encode())}"
    return f"{size} + octet_length(value)" if with_value else size


@dataclass(frozen=True, slots=True)
class PutItem:
    """One key to write; ``if_revision`` None means unconditional."""

    key: str
    value: bytes
    content_type: str
    ttl_ms: int
    if_revision: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of put_many: the new revision and the written keys, or a mismatch."""

    revision: int
    kvs: list[kv_pb2.KeyValue]
    previous: list[kv_pb2.KeyValue | None]
    mismatch_key: str | None = None
    mismatch_current: int = 0


@dataclass(frozen=True, slots=True)
class _PutEntry:
    """One put_many call waiting for its group commit."""

    tenant: str
    namespace: str
    items: tuple[PutItem, ...]
    return_previous: bool


def _write_result(entry: _PutEntry, rows: list[asyncpg.Record]) -> WriteResult:
    """An entry's WriteResult from its kv.put_batch rows."""
    first = rows[0]
    if first["r_status"] == "mismatch":
        return WriteResult(first["r_revision"], [], [], first["r_key"], first["r_prev_mod_revision"])
    by_key = {row["r_key"]: row for row in rows}
    kvs: list[kv_pb2.KeyValue] = []
    previous: list[kv_pb2.KeyValue | None] = []
    for item in entry.items:
        row = by_key[item.key]
        kvs.append(
            kv_pb2.KeyValue(
                namespace=entry.namespace,
                key=item.key,
                value=item.value,
                content_type=item.content_type,
                create_revision=row["r_create_revision"],
                mod_revision=row["r_revision"],
                version=row["r_version"],
                expire_time=to_timestamp(row["r_expires_at"]),
            )
        )
        previous.append(
            None
            if row["r_prev_mod_revision"] is None
            else entry_to_kv(entry.namespace, row, "r_prev_", key=item.key)
        )
    return WriteResult(first["r_revision"], kvs, previous)


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The outcome of a delete: revision, removed keys, or a mismatch."""

    revision: int
    deleted: list[kv_pb2.KeyValue]
    mismatch_key: str | None = None
    mismatch_current: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log."""

    revision: int
    kind: int
    kv: kv_pb2.KeyValue


class ChangesPage(NamedTuple):
    """A page of the change log and the snapshot it was read in."""

    changes: list[Change]
    current: int  # the store's revision
    compacted: int  # the oldest revision still in the log
    tenant_uid: str | None  # the registry id of the tenant with the slug asked for (None: none)


def entry_to_kv(
    namespace: str, row: asyncpg.Record, prefix: str = "", key: str | None = None
) -> kv_pb2.KeyValue:
    """A ``KeyValue`` from a row with the entry columns, each named ``prefix`` + column.

    A NULL value (keys-only listings, delete events) becomes empty; ``key``
    overrides a row without a key column.
    """
    return kv_pb2.KeyValue(
        namespace=namespace,
        key=row[prefix + "key"] if key is None else key,
        value=row[prefix + "value"] or b"",
        content_type=row[prefix + "content_type"],
        create_revision=row[prefix + "create_revision"],
        mod_revision=row[prefix + "mod_revision"],
        version=row[prefix + "version"],
        expire_time=to_timestamp(row[prefix + "expires_at"]),
    )


class WriteListener(Protocol):
    """What a :class:`KvStore` tells of each put batch (see services.kv.publisher)."""

    async def written(self, written: list[tuple[str, WriteResult]]) -> None:
        """The batch's committed writes, (tenant, result) per entry: told before any caller hears
        back, whether or not it still waits, the next batch's write already under way."""

    async def unknown(self, keys: list[tuple[str, str, str]]) -> None:
        """The batch's keys, (tenant, namespace, key), when it was sent but never answered
        (a deadline, a lost connection): it may have committed."""


class KvStore:
    """The KV tables of one database."""

    def __init__(self, db: Database, listener: WriteListener) -> None:
        """``listener`` hears of every put batch, once, before any of its callers is answered."""
        self._db = db
        self._listener = listener
        self._group: GroupCommit[_PutEntry, WriteResult] = GroupCommit(self._put_batch, after=self._written)

    def group_commit_stats(self) -> dict[str, int]:
        """Batches written and puts they carried, since start (entries / batches: puts per commit)."""
        return {"batches": self._group.batches, "entries": self._group.entries}

    async def get(self, tenant: str, namespace: str, key: str, *, timeout: float) -> asyncpg.Record | None:
        """The live entry row of one key, or None."""
        return await self._db.fetchrow(
            f"SELECT {_ENTRY_COLUMNS} FROM kv.entries "
            f"WHERE tenant = $1 AND namespace = $2 AND key = $3 AND {_LIVE}",
            tenant,
            namespace,
            key,
            timeout=timeout,
        )

    async def get_many(
        self, tenant: str, namespace: str, keys: Sequence[str], *, budget: int, timeout: float
    ) -> list[asyncpg.Record]:
        """The live entry rows of ``keys`` (any order; absent keys left out).

        ``budget``: the bytes the entries may take in an answer; past it,
        :class:`shared.api.answers.OverBudget`, before the values are sent.
        """
        read = (
            f"SELECT {_ENTRY_COLUMNS}, {_entry_bytes(namespace)} AS answer_bytes FROM kv.entries "
            f"WHERE tenant = $1 AND namespace = $2 AND key = ANY($3::text[]) AND {_LIVE}"
        )
        rows = await self._db.fetch(
            cut_by_bytes(read, "key", "$4"), tenant, namespace, list(keys), budget, timeout=timeout
        )
        fit, past = split_at_budget(rows, budget)
        if past is not None:
            raise OverBudget
        return fit

    async def put_many(
        self, tenant: str, namespace: str, items: Sequence[PutItem], *, return_previous: bool, timeout: float
    ) -> WriteResult:
        """Write ``items`` atomically at one new revision, in the next group commit (see kv.put_batch)."""
        entry = _PutEntry(tenant, namespace, tuple(items), return_previous)
        result = await self._group.submit(entry, timeout)
        # The batch ran in another writer's call: this one's consistency token is the
        # newest WAL position this process's writes reached (at or past the batch's).
        note_commit(self._db.latest_lsn)
        return result

    async def _put_batch(self, entries: Sequence[_PutEntry], timeout: float) -> list[WriteResult]:
        starts: list[int] = []
        items: list[PutItem] = []
        for entry in entries:
            starts.append(len(items) + 1)
            items.extend(entry.items)
        try:
            rows = await self._put_rows(entries, starts, items, timeout)
        except asyncpg.PostgresError:
            raise  # the statement failed: nothing was written
        except Exception:
            await self._listener.unknown([(e.tenant, e.namespace, i.key) for e in entries for i in e.items])
            raise
        by_entry: list[list[asyncpg.Record]] = [[] for _ in entries]
        for row in rows:
            by_entry[row["r_entry"] - 1].append(row)
        return [_write_result(e, r) for e, r in zip(entries, by_entry, strict=True)]

    async def _written(self, entries: Sequence[_PutEntry], results: list[WriteResult]) -> None:
        # An error here is logged by the group: committed is committed, the callers get their results.
        await self._listener.written(
            [(e.tenant, r) for e, r in zip(entries, results, strict=True) if r.mismatch_key is None]
        )

    async def _put_rows(
        self, entries: Sequence[_PutEntry], starts: list[int], items: list[PutItem], timeout: float
    ) -> list[asyncpg.Record]:
        return await self._db.write_rows(
            "SELECT * FROM kv.put_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [e.tenant for e in entries],
            [e.namespace for e in entries],
            [e.return_previous for e in entries],
            starts,
            [len(e.items) for e in entries],
            [i.key for i in items],
            [i.value for i in items],
            [i.content_type for i in items],
            [i.ttl_ms for i in items],
            [i.if_revision for i in items],
            timeout=timeout,
        )

    async def delete_range(
        self,
        tenant: str,
        namespace: str,
        keys: KeyRange,
        *,
        if_revision: int | None,
        return_previous: bool,
        timeout: float,
    ) -> DeleteResult:
        """Delete the live keys of ``keys`` at one new revision (see kv.delete_range)."""
        rows = await self._db.write_rows(
            "SELECT * FROM kv.delete_range($1, $2, $3, $4, $5, $6)",
            tenant,
            namespace,
            keys.start,
            keys.end,
            if_revision,
            return_previous,
            timeout=timeout,
        )
        first = rows[0]
        if first["r_status"] == "mismatch":
            return DeleteResult(first["r_revision"], [], first["r_key"], first["r_mod_revision"])
        if first["r_status"] == "none":
            return DeleteResult(first["r_revision"], [])
        deleted = [entry_to_kv(namespace, row, "r_") for row in rows]
        return DeleteResult(first["r_revision"], deleted)

    async def list_page(
        self,
        tenant: str,
        namespace: str,
        keys: KeyRange,
        after: str | None,
        limit: int,
        *,
        keys_only: bool,
        budget: int,
        timeout: float,
    ) -> tuple[list[asyncpg.Record], bool]:
        """Up to ``limit`` live entries of ``keys`` after the key ``after``, in key order, and whether
        the page was cut short because its keys and values would pass ``budget`` bytes
        (:func:`shared.api.answers.cut_by_bytes`: Postgres counts; what is past the budget is not sent)."""
        value = "NULL::bytea AS value" if keys_only else "value"
        columns = _ENTRY_COLUMNS.replace("value", value, 1)
        size = _entry_bytes(namespace, with_value=not keys_only)
        conditions = ["tenant = $1", "namespace = $2", "key >= $3", _LIVE]
        args: list[object] = [tenant, namespace, keys.start]
        if keys.end is not None:
            args.append(keys.end)
            conditions.append(f"key < ${len(args)}")
        if after is not None:
            args.append(after)
            conditions.append(f"key > ${len(args)}")
        args += [limit, budget]
        page = (
            f"SELECT {columns}, {size} AS answer_bytes FROM kv.entries "
            f"WHERE {' AND '.join(conditions)} ORDER BY key LIMIT ${len(args) - 1}"
        )
        sql = cut_by_bytes(page, "key", f"${len(args)}")
        rows = await self._db.read_replica(lambda db: db.fetch(sql, *args, timeout=timeout))
        fit, past = split_at_budget(rows, budget)
        return fit, past is not None

    async def count(self, tenant: str, namespace: str, keys: KeyRange, *, timeout: float) -> int:
        """How many live keys ``keys`` holds."""
        if keys.end is None:
            sql = (
                "SELECT count(*) FROM kv.entries "
                f"WHERE tenant = $1 AND namespace = $2 AND key >= $3 AND {_LIVE}"
            )
            args: tuple[object, ...] = (tenant, namespace, keys.start)
        else:
            sql = (
                "SELECT count(*) FROM kv.entries "
                f"WHERE tenant = $1 AND namespace = $2 AND key >= $3 AND key < $4 AND {_LIVE}"
            )
            args = (tenant, namespace, keys.start, keys.end)
        return int(await self._db.read_replica(lambda db: db.fetchval(sql, *args, timeout=timeout)))

    async def namespaces(self, tenant: str, *, timeout: float) -> list[str]:
        """Every namespace in which ``tenant`` has rows (live or expired)."""
        rows = await self._db.fetch(
            "SELECT DISTINCT namespace FROM kv.entries WHERE tenant = $1", tenant, timeout=timeout
        )
        return [row["namespace"] for row in rows]

    async def revisions(self, *, timeout: float) -> tuple[int, int]:
        """(current store revision, compacted revision)."""
        row = await self._db.fetchrow(
            "SELECT s.current, c.revision AS compacted FROM kv.store_revision s, kv.compaction c",
            timeout=timeout,
        )
        assert row is not None
        return row["current"], row["compacted"]

    async def changes_after(
        self,
        tenant: str,
        namespace: str,
        keys: KeyRange,
        cursor: tuple[int, str | None],
        limit: int,
        *,
        timeout: float,
    ) -> ChangesPage:
        """Changes to ``keys`` after ``cursor`` in (revision, key) order, with the snapshot they come from.

        ``cursor`` is (revision, key): changes of later revisions, and of that
        revision with a greater key (None: none of that revision). Everything
        comes from one snapshot: when no change is returned, nothing matching
        happened up to ``current``; and the changes belong to the tenant whose
        registry id is ``tenant_uid`` (None: no tenant has the slug now).
        """
        after_revision, after_key = cursor
        end_condition = "AND ch.key < $4" if keys.end is not None else "AND $4::text IS NULL"
        rows = await self._db.fetch(
            f"""
            SELECT s.current, c.revision AS compacted,
                   (SELECT t.id::text FROM tenants.tenants t WHERE t.slug = $7) AS tenant_uid, ch.*
            FROM kv.store_revision s CROSS JOIN kv.compaction c
            LEFT JOIN LATERAL (
                SELECT ch.revision, ch.revision AS mod_revision, ch.key, ch.kind, ch.value,
                       ch.content_type, ch.create_revision, ch.version, ch.expires_at
                FROM kv.changes ch
                WHERE ch.tenant = $7 AND ch.namespace = $1 AND ch.key >= $3 {end_condition}
                  AND (ch.revision > $2 OR (ch.revision = $2 AND ch.key > $6::text))
                ORDER BY ch.revision, ch.key
                LIMIT $5
            ) ch ON true
            """,
            namespace,
            after_revision,
            keys.start,
            keys.end,
            limit,
            after_key,
            tenant,
            timeout=timeout,
        )
        changes = [
            Change(row["revision"], row["kind"], entry_to_kv(namespace, row))
            for row in rows
            if row["revision"] is not None
        ]
        return ChangesPage(changes, rows[0]["current"], rows[0]["compacted"], rows[0]["tenant_uid"])

    async def sweep_expired(self, limit: int) -> tuple[int | None, int]:
        """Remove up to ``limit`` expired keys; (revision or None, how many)."""
        row = await self._db.write_row("SELECT * FROM kv.sweep_expired($1)", limit)
        assert row is not None
        return row["r_revision"], row["r_removed"]

    async def compact(self, keep_revisions: int) -> int | None:
        """Forget change-log entries older than the newest ``keep_revisions``; the new compacted revision."""
        current, compacted = await self.revisions(timeout=30.0)
        target = current - keep_revisions
        if target <= compacted:
            return None
        value = await self._db.write_row("SELECT kv.compact($1) AS compacted", target)
        assert value is not None
        return int(value["compacted"])

"""SIGTERM on a service process: health NOT_SERVING, new calls refused, in-flight calls finish, exit.

The kv process of a launcher of the test's own is stopped while Puts are
held in flight, deterministically: the test holds the row lock on
``kv.store_revision`` that every write takes first (see
services/kv/migrations/0001_kv_store.sql), so the Puts wait inside the
process until the test lets them go.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from shared.api.callers import Caller
from shared.config.settings import Settings
from tests.conftest import signed_channel
from tests.e2e.test_metrics import sample, scrape
from tests.support.errors import error_info
from tests.support.stack import Stack, remove_data, start_stack

pytestmark = pytest.mark.e2e

GRACE_S = 30.0  # STRATA_SHUTDOWN_GRACE_S of the stack: far longer than the test holds the lock
PUTS = 5
WAIT_S = 60.0  # the longest any step below may take on a slow machine
CALLER = Caller(f"drain-{uuid.uuid4().hex[:8]}", frozenset({"kv:read", "kv:write"}), "drain-key")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def own_stack(settings: Settings) -> AsyncIterator[Stack]:
    """A launcher of the test's own (the test stops its kv process) on the session's backends."""
    stack = await start_stack(settings, STRATA_SHUTDOWN_GRACE_S=str(GRACE_S))
    try:
        yield stack
    finally:
        await stack.stop()
        remove_data(stack)


async def until(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait until ``check()`` is true (awaited if need be), polling; fails the test after :data:`WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        await asyncio.sleep(0.05)


def logged(stack: Stack, message: str) -> list[dict[str, Any]]:
    """The JSON log entries with ``msg`` equal to ``message`` that the stack's processes wrote."""
    entries = []
    for line in stack.output:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("msg") == message:
                entries.append(entry)
    return entries


def has_exited(pid: int) -> bool:
    """Whether process ``pid`` is gone (reaped, or a zombie its parent has yet to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def health_of(port: int) -> int:
    """The overall ``grpc.health.v1`` status of the process on ``port`` (unsigned, as a balancer asks)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def serving(port: int) -> bool:
    try:
        return await health_of(port) == SERVING
    except grpc.aio.AioRpcError:
        return False  # not listening yet


async def hold_write_lock(settings: Settings) -> asyncpg.Connection:
    """A connection (the owner's) holding the store revision's row lock, in an open transaction."""
    conn = await asyncpg.connect(settings.migrate_database_url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT current FROM kv.store_revision WHERE singleton FOR UPDATE")
    return conn


async def writers_waiting_on_the_lock(conn: asyncpg.Connection) -> int:
    """Statements of other sessions writing KV entries that wait on a lock.

    ``conn`` holds the lock in an open transaction, and Postgres snapshots
    pg_stat_activity once per transaction: the snapshot is cleared first, or a
    poll made before the first Put reached the lock would be all later polls see.
    """
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock' AND query LIKE '%kv.put_batch%'"
        )
    )


async def stored(settings: Settings, namespace: str) -> dict[str, tuple[bytes, int]]:
    """key → (value, mod_revision) of the caller's entries in ``namespace``, from Postgres."""
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        rows = await conn.fetch(
            "SELECT key, value, mod_revision FROM kv.entries WHERE tenant = $1 AND namespace = $2",
            CALLER.tenant,
            namespace,
        )
    finally:
        await conn.close()
    return {row["key"]: (bytes(row["value"]), row["mod_revision"]) for row in rows}


async def test_sigterm_refuses_new_calls_and_finishes_the_puts_in_flight_before_exiting(
    own_stack: Stack, settings: Settings
) -> None:
    port, namespace = own_stack.ports["kv"], f"drain-{uuid.uuid4().hex[:8]}"
    kv_pid = own_stack.launched.pids()["kv"]
    values = {f"k{i}": f"value-{i}".encode() for i in range(PUTS)}

    async def in_flight() -> float:
        return sample(await scrape(own_stack, "kv"), "strata_calls_in_flight", component="kv")

    async def all_in_flight() -> bool:
        return await in_flight() == PUTS

    async def blocked_on_the_lock() -> bool:
        return await writers_waiting_on_the_lock(lock) > 0

    async def not_serving() -> bool:
        return await health_of(port) == NOT_SERVING

    async with signed_channel(port, CALLER) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        lock = await hold_write_lock(settings)
        try:
            puts = [
                asyncio.ensure_future(
                    kv.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=value), timeout=WAIT_S)
                )
                for key, value in values.items()
            ]
            # Every Put is inside the process, the first batch waiting on the lock in Postgres.
            await until(all_in_flight, f"{PUTS} calls in flight")
            await until(blocked_on_the_lock, "a Put waiting on the lock")

            stopped_at = time.monotonic()
            os.kill(kv_pid, signal.SIGTERM)
            await until(not_serving, "kv's health NOT_SERVING")
            assert not any(put.done() for put in puts), "a Put finished while the lock was held"
            assert not has_exited(kv_pid), "kv exited with calls in flight"

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kv.Put(kv_pb2.PutRequest(namespace=namespace, key="late", value=b"x"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(refused.value).reason == "SHUTTING_DOWN"
            assert not any(put.done() for put in puts)
            assert await in_flight() == PUTS
        finally:
            await lock.close()  # ends the transaction: the lock is released

        replies = await asyncio.wait_for(asyncio.gather(*puts), WAIT_S)

    await until(lambda: has_exited(kv_pid), "kv exited")
    assert time.monotonic() - stopped_at <= GRACE_S, "kv did not exit within its grace period"
    await until(lambda: bool(logged(own_stack, "service exited; restarting")), "the launcher saw kv exit")
    assert [(e["service"], e["code"]) for e in logged(own_stack, "service exited; restarting")] == [("kv", 0)]
    assert [e["drained"] for e in logged(own_stack, "stopped") if e["service"] == "kv"] == [True]

    revisions = {key: reply.kv.mod_revision for key, reply in zip(values, replies, strict=True)}
    assert all(reply.header.revision > 0 for reply in replies)
    assert await stored(settings, namespace) == {key: (values[key], revisions[key]) for key in values}

    # The launcher starts kv again; what the drained Puts wrote reads back through it.
    await until(lambda: own_stack.launched.pids().get("kv", kv_pid) != kv_pid, "kv restarted")
    await until(lambda: serving(port), "the new kv serving")
    async with signed_channel(port, CALLER) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        for key, value in values.items():
            got = await kv.Get(kv_pb2.GetRequest(namespace=namespace, key=key), timeout=10)
            assert (got.kv.value, got.kv.mod_revision) == (value, revisions[key])
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await kv.Get(kv_pb2.GetRequest(namespace=namespace, key="late"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

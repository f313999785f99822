"""Reads over real streaming replicas: spreading, breakers, replay lag, read-your-writes.

One embedded primary with two streaming replicas (pg_basebackup -R) for the
module. Which server answered a read is what ``inet_server_port()`` says.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from devstack.backends import Backends
from shared.config.settings import Settings
from shared.storage.consistency import begin_call, format_lsn, required_lsn
from shared.storage.db import Database
from shared.storage.replicas import ReplicaSet
from shared.storage.service_db import open_service_database
from tests.support.replicas import pause_replay, replicated_backends, resume_replay, wait_replayed

T = TypeVar("T")
PORT = "SELECT inet_server_port()"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Backends]:
    async with replicated_backends(Path(tmp_path_factory.mktemp("replicated")), replicas=2) as backends:
        owner = await asyncpg.connect(backends.migrate_database_url)
        try:
            await owner.execute(
                "CREATE TABLE IF NOT EXISTS public.replica_notes (id text PRIMARY KEY, body text);"
                "GRANT SELECT, INSERT, DELETE ON public.replica_notes TO strata_service"
            )
        finally:
            await owner.close()
        for replica in backends.replicas:
            await wait_replayed(replica.urls.owner, backends.migrate_database_url)
        yield backends


def _settings(cluster: Backends, **overrides: Any) -> Settings:
    return Settings(
        database_url=cluster.database_url,
        database_read_urls=cluster.database_read_urls,
        replica_probe_interval_s=0.05,
        replica_open_s=0.3,
        replica_failures_to_open=2,
        **overrides,
    )


@pytest.fixture
async def db(cluster: Backends) -> AsyncIterator[Database]:
    """The primary's Database with the two replicas (round robin), as a service opens it."""
    database = await open_service_database(_settings(cluster, read_strategy="round_robin"), "test")
    assert database.replicas is not None
    yield database
    await database.close()


def _ports(cluster: Backends) -> tuple[int, list[int]]:
    return cluster.postgres.port, [r.port for r in cluster.replicas]  # type: ignore[union-attr]


def _in_new_call(work: Callable[[], Awaitable[T]], token: str | None = None) -> Awaitable[T]:
    """Run ``work`` as a new gRPC call would: its own consistency tokens, optionally sent one."""

    async def call() -> T:
        begin_call([("strata-consistency-token", token)] if token else [])
        return await work()

    return asyncio.get_running_loop().create_task(call(), context=contextvars.Context())


async def _served_by(db: Database, sql: str = PORT, *args: Any) -> Any:
    return await db.read_replica(lambda d: d.fetchval(sql, *args, timeout=5))


async def test_reads_spread_over_the_replicas_and_never_reach_the_primary(cluster, db):
    primary, replicas = _ports(cluster)
    ports = Counter([await _in_new_call(lambda: _served_by(db)) for _ in range(40)])
    assert set(ports) == set(replicas) and primary not in ports
    assert abs(ports[replicas[0]] - ports[replicas[1]]) <= 1  # round robin
    assert db.replicas.primary_reads == 0


async def test_least_in_flight_sends_concurrent_reads_to_the_idler_replica(cluster):
    database = await open_service_database(_settings(cluster, read_strategy="least_in_flight"), "test")
    try:
        _, replicas = _ports(cluster)
        slow = "SELECT inet_server_port() FROM pg_sleep(0.2)"
        ports = Counter(await asyncio.gather(*(_served_by(database, slow) for _ in range(8))))
        assert ports == {replicas[0]: 4, replicas[1]: 4}
    finally:
        await database.close()


async def test_lowest_latency_prefers_the_replica_answering_faster(cluster):
    database = await open_service_database(_settings(cluster, read_strategy="lowest_latency"), "test")
    try:
        _, replicas = _ports(cluster)
        assert database.replicas is not None
        database.replicas.probe_interval_s = 3600.0  # hold the measured figures still
        first, second = database.replicas.replicas
        first.latency_s, second.latency_s = 0.050, 0.001
        ports = Counter([await _served_by(database) for _ in range(10)])
        assert ports == {replicas[1]: 10}
    finally:
        await database.close()


async def test_a_caller_reads_its_own_write_while_every_replica_is_paused(cluster, db):
    primary, replicas = _ports(cluster)
    for replica in cluster.replicas:
        await pause_replay(replica.urls.owner)
    try:

        async def write_then_read() -> tuple[int, int, str | None]:
            await db.write_row("INSERT INTO public.replica_notes VALUES ('ryw', 'mine')", timeout=5)
            port = await _served_by(db)
            body = await _served_by(db, "SELECT body FROM public.replica_notes WHERE id = 'ryw'")
            return required_lsn(), port, body

        token, port, body = await _in_new_call(write_then_read)
        assert token > 0 and port == primary and body == "mine"
        # Another call, token in hand (what the gateway adds for the same API key): the primary too.
        token_text = format_lsn(token)
        seen = await _in_new_call(
            lambda: _served_by(db, "SELECT body FROM public.replica_notes WHERE id = 'ryw'"), token_text
        )
        assert seen == "mine"
        # Without a token a read may be older: the paused replicas serve it and do not have the row.
        assert await _in_new_call(lambda: _served_by(db)) in replicas
        unseen = await _in_new_call(
            lambda: _served_by(db, "SELECT count(*) FROM public.replica_notes WHERE id = 'ryw'")
        )
        assert unseen == 0
    finally:
        for replica in cluster.replicas:
            await resume_replay(replica.urls.owner)
    # Replay resumed: once a probe sees a replica past the token, the token's reads go there again.
    deadline = time.monotonic() + 10
    while True:
        port = await _in_new_call(lambda: _served_by(db), token_text)
        if port in replicas:
            break
        assert time.monotonic() < deadline, "no replica served the token's reads after replay resumed"
        await asyncio.sleep(0.05)
    found = await _in_new_call(
        lambda: _served_by(db, "SELECT body FROM public.replica_notes WHERE id = 'ryw'"), token_text
    )
    assert found == "mine"
    await db.write_row("DELETE FROM public.replica_notes WHERE id = 'ryw'", timeout=5)


async def test_a_replica_stopped_under_load_fails_no_read_and_serves_again_once_back(cluster, db):
    primary, replicas = _ports(cluster)
    victim = cluster.replicas[0]
    assert db.replicas is not None
    errors: list[BaseException] = []
    served: Counter[int] = Counter()
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            try:
                served[await _in_new_call(lambda: _served_by(db))] += 1
            except Exception as exc:  # every failure is the finding
                errors.append(exc)

    readers = [asyncio.create_task(reader()) for _ in range(16)]
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(victim.stop)
        before = served.copy()
        await asyncio.sleep(1.5)
        after_stop = served - before
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert errors == []
    state = db.replicas.replicas[0]
    assert state.breaker.state != "closed" and state.state == "unreachable"
    assert after_stop[replicas[0]] == 0 or after_stop[replicas[0]] < after_stop[replicas[1]] / 10
    assert after_stop[replicas[1]] > 0

    await asyncio.to_thread(victim.start)
    deadline = time.monotonic() + 15
    while state.breaker.state != "closed":
        assert time.monotonic() < deadline, f"breaker stayed {state.breaker.state}: {state.error}"
        await asyncio.sleep(0.05)
    ports = Counter([await _in_new_call(lambda: _served_by(db)) for _ in range(20)])
    assert ports[replicas[0]] > 0 and primary not in ports


async def test_replay_lag_past_the_bound_opens_the_breaker_until_it_catches_up(cluster):
    database = await open_service_database(_settings(cluster, replica_max_lag_bytes=4096), "test")
    try:
        assert database.replicas is not None
        _, replicas = _ports(cluster)
        lagging = cluster.replicas[1]
        await pause_replay(lagging.urls.owner)
        try:
            for i in range(20):  # well past 4 KiB of WAL
                await database.write_row(
                    "INSERT INTO public.replica_notes VALUES ($1, repeat('x', 1000))", f"lag-{i}", timeout=5
                )
            state = database.replicas.replicas[1]
            # The other replica may lag past 4 KiB for an instant while it replays the
            # inserts (its breaker then opens too): wait until it has caught up and closed.
            await wait_replayed(cluster.replicas[0].urls.owner, cluster.migrate_database_url)
            healthy = database.replicas.replicas[0]
            deadline = time.monotonic() + 10
            while state.state != "lagging" or healthy.breaker.state != "closed":
                assert time.monotonic() < deadline, (state.status(), healthy.status())
                await asyncio.sleep(0.02)
            assert state.breaker.state == "open" and state.lag_bytes > 4096
            ports = Counter([await _in_new_call(lambda: _served_by(database)) for _ in range(10)])
            assert ports == {replicas[0]: 10}
        finally:
            await resume_replay(lagging.urls.owner)
        deadline = time.monotonic() + 10
        while state.breaker.state != "closed":
            assert time.monotonic() < deadline, state.status()
            await asyncio.sleep(0.05)
        assert state.state == "streaming" and state.lag_bytes <= 4096
        await database.write_row("DELETE FROM public.replica_notes WHERE id LIKE 'lag-%'", timeout=5)
    finally:
        await database.close()


async def test_a_replica_that_is_not_in_recovery_is_never_read(cluster):
    # The primary named as a "replica": what a promoted replica looks like.
    settings = Settings(database_url=cluster.database_url, database_read_urls=(cluster.database_url,))
    database = await open_service_database(settings, "test")
    try:
        assert database.replicas is not None
        (state,) = database.replicas.status()
        assert state.state == "not_a_replica" and state.breaker == "open"
        assert database.replicas.pick() is None
    finally:
        await database.close()


async def test_a_read_error_of_the_query_itself_is_not_hidden_by_a_fallback(db):
    with pytest.raises(asyncpg.exceptions.UndefinedTableError):
        await _in_new_call(lambda: _served_by(db, "SELECT * FROM public.no_such_table"))
    assert db.replicas.fallbacks == 0


async def test_status_reports_each_replica(cluster, db):
    _, replicas = _ports(cluster)
    await db.replicas.probe()
    status = db.replicas.status()
    assert [s.address for s in status] == [f"127.0.0.1:{p}" for p in replicas]
    for s in status:
        assert s.state == "streaming" and s.breaker == "closed" and s.replay_lsn > 0 and s.error == ""
    assert isinstance(db.replicas, ReplicaSet)

"""Faults while load flows through the gateway: nothing acknowledged is lost, everything recovers.

One launcher of its own (processes are killed here), on the session's
embedded Postgres and Redis (which are stopped and started here, as
tests/integration/test_kv_faults.py does for one service in-process).
``make chaos`` runs the same machinery (tests/chaos.py) for minutes.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos import Faults, Load, RunFigures, provision_tenant, verify
from tests.support.stack import remove_data, start_stack

pytestmark = pytest.mark.e2e

# Codes a caller may see while a backend or a process is down (retryable), and
# NOT_FOUND for a key not yet written: never a wrong answer, never INTERNAL/UNKNOWN.
EXPECTED = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND"}


@pytest.fixture
async def own_stack(settings, backends):
    if backends.redis is None or backends.postgres is None:
        pytest.skip("needs the embedded servers to stop and start them")
    # The load is not what is limited here: a generous rate for its key.
    stack = await start_stack(settings, STRATA_RATE_LIMIT_RPS="100000", STRATA_RATE_LIMIT_BURST="100000")
    yield stack
    await stack.stop()
    remove_data(stack)


async def test_acknowledged_writes_survive_every_fault_under_load(own_stack, backends):
    metadata = await provision_tenant(own_stack, "faults")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with Load(own_stack.gateway, metadata, "faults", workers=8) as load:
        faults = Faults(own_stack, backends, load.ledger, outage_s=1.5)
        services_before = {name: faults.service_pid(name) for name in ("kv", "tenants", "gateway")}
        await asyncio.sleep(1.5)
        await faults.redis_killed()
        await asyncio.sleep(1.0)
        await faults.postgres_restarted()
        await asyncio.sleep(1.0)
        # Both backends came back and the services carried on: no process was restarted for it.
        assert {name: faults.service_pid(name) for name in services_before} == services_before
        await faults.service_killed("kv")
        await asyncio.sleep(1.0)
        await faults.service_killed("tenants")
        await asyncio.sleep(1.0)
        await faults.gateway_terminated()
        await asyncio.sleep(1.5)
    verdict = await verify(own_stack.gateway, metadata, "faults", load.ledger)
    figures = RunFigures(loop.time() - started, load.workers, load.ledger, faults.figures, verdict)
    print("\n" + figures.summary())

    assert verdict.keys_checked >= 8 and verdict.records_checked > 0
    assert verdict.keys_lost == [] and verdict.records_lost == []
    assert load.ledger.stale_reads == []
    # grpc.aio answers CANCELLED to calls its core accepted but had not handed to the
    # server yet when the server stops (grpc/grpc#41785): only while the gateway exits.
    assert all(figures.fault_at(when) == "gateway sent SIGTERM" for when, _, _ in load.ledger.odd), (
        figures.summary()
    )
    assert len(load.ledger.odd) <= load.workers
    assert set(load.ledger.codes) - {"CANCELLED"} <= EXPECTED, figures.summary()
    assert load.ledger.codes["OK"] > 2 * sum(n for code, n in load.ledger.codes.items() if code != "OK")
    assert len(faults.figures) == 5

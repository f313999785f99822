"""Hostile strings and extreme numbers in every field of every request: OK or a clear status, never
the victim's data; and the index-declaration race this walk found."""

from __future__ import annotations

import asyncio

import pytest
from strata.tenants.v1 import tenants_pb2

from tests.e2e.hostile.names import NAME, VICTIM_MARK
from tests.e2e.hostile.rpcs import BY_ID, RPCS, Rpc, params, slots, with_value
from tests.e2e.hostile.stage import OK, Hostile, report

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("rpc", params(RPCS))
async def test_hostile_values_in_every_field_get_ok_or_a_clear_status(hostile: Hostile, rpc: Rpc) -> None:
    jobs = [(slot, value) for slot in slots(rpc.method.input_type) for value in slot.values]
    bodies = [with_value(rpc, slot, value).SerializeToString() for slot, value in jobs]
    failures = []
    for label, outcome in await hostile.both(rpc, bodies):
        slot, value = jobs[int(label.split("#")[1])]
        problem = outcome.problem()
        if (
            problem is None
            and outcome.code == OK
            and rpc.tenant_scoped
            and VICTIM_MARK.encode() in outcome.response
        ):
            problem = "the answer carries the victim's data"
        if problem is not None:
            failures.append(f"{label} {'.'.join(slot.path)}={str(value)[:40]!r}: {problem}")
    report(failures, "hostile values answered unclearly")
    await hostile.assert_healthy()


async def test_declaring_one_index_concurrently_answers_every_caller_with_it(hostile: Hostile) -> None:
    # Found by the hostile walk, whose calls for one method run concurrently; reliable at 12 x 6.
    # tenants.declare_index once checked, built and registered the index with no lock between,
    # so the losers failed with 23505 or 42P07; migration 0005 serialises them (advisory lock).
    rpc = BY_ID["TenantService.DeclareIndex"]
    failures = []
    for round_ in range(6):
        index = tenants_pb2.RecordIndex(collection=NAME, path=f"race{round_}")
        body = tenants_pb2.DeclareIndexRequest(index=index).SerializeToString()
        outcomes = await asyncio.gather(*(hostile.call(rpc, body, "direct") for _ in range(12)))
        failures += [f"{index.path}: {o.code.name} {o.reason}" for o in outcomes if o.code != OK]
        created = [rpc.response(o.response).created for o in outcomes if o.code == OK]
        assert created.count(True) <= 1
        if len(created) == len(outcomes):  # every caller answered: exactly one of them built it
            assert created.count(True) == 1, created
    await hostile.assert_healthy()
    report(failures, "concurrent declarations of an index not answered with it")

"""Forged caller identities sent straight to the service ports: UNAUTHENTICATED, nothing written."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from shared.api.callers import Caller
from shared.rpc.identity import sign_caller
from tests.e2e.hostile.database import changed_rows, kv_revision
from tests.e2e.hostile.names import ATTACKER, NAME, VICTIM
from tests.e2e.hostile.rpcs import RPCS, Rpc, request_for
from tests.e2e.hostile.stage import SECRET, Hostile, Metadata, report, signed_body
from tests.support.calls import bearer

pytestmark = pytest.mark.e2e


def _forgeries(rpc: Rpc) -> dict[str, Metadata]:
    """Metadata a caller without the internal secret might send to a service port."""
    now = time.time()
    body = signed_body(rpc, request_for(rpc).SerializeToString())  # what the test sends
    good = sign_caller(SECRET, rpc.path, ATTACKER, body=body)

    def edited(key: str, value: str) -> Metadata:
        return [(k, value if k == key else v) for k, v in good]

    reader = sign_caller(SECRET, rpc.path, Caller(NAME, frozenset({"kv:read"}), "reader"), body=body)
    other_method = next(r for r in RPCS if r.path != rpc.path).path
    forgeries = {
        "no signature": [],
        "wrong secret": sign_caller(b"guessed-secret-guessed-secret", rpc.path, ATTACKER, body=body),
        "tenant edited after signing": edited("x-strata-tenant", VICTIM),
        "scopes edited after signing": [
            (k, "admin,internal" if k == "x-strata-scopes" else v) for k, v in reader
        ],
        "key id edited after signing": edited("x-strata-key-id", "someone-else"),
        "timestamp edited after signing": edited("x-strata-ts", f"{now + 1:.3f}"),
        "expired": sign_caller(SECRET, rpc.path, ATTACKER, now=now - 3600, body=body),
        "older than the window": sign_caller(SECRET, rpc.path, ATTACKER, now=now - 30, body=body),
        "from the future": sign_caller(SECRET, rpc.path, ATTACKER, now=now + 3600, body=body),
        "signed for another method": sign_caller(SECRET, other_method, ATTACKER, body=body),
        "a second tenant header": [*good, ("x-strata-tenant", VICTIM)],
        "signature in upper case": edited("x-strata-signature", dict(good)["x-strata-signature"].upper()),
        "timestamp not a number": edited("x-strata-ts", "soon"),
        "no timestamp": [(k, v) for k, v in good if k != "x-strata-ts"],
        "a bearer key instead": bearer("sk_0000000000000000_" + "A" * 43),
    }
    if body is not None:  # a captured identity replayed with another request
        forgeries["signed for another body"] = sign_caller(SECRET, rpc.path, ATTACKER, body=body + b"\x00")
        forgeries["signed for an upload"] = sign_caller(SECRET, rpc.path, ATTACKER, body=None)
    return forgeries


async def test_forged_identities_sent_straight_to_a_service_are_unauthenticated_and_write_nothing(
    hostile: Hostile,
) -> None:
    since = await kv_revision(hostile.settings)
    before = await hostile.snapshot(exclude=(), since=since)
    jobs = [(rpc, name, metadata) for rpc in RPCS for name, metadata in _forgeries(rpc).items()]
    outcomes = await asyncio.gather(
        *(
            hostile.call(rpc, request_for(rpc).SerializeToString(), "direct", metadata=metadata)
            for rpc, _, metadata in jobs
        )
    )
    failures = [
        f"{rpc.id}, {name}: {outcome.code.name} {outcome.reason} {outcome.details[:100]}"
        for (rpc, name, _), outcome in zip(jobs, outcomes, strict=True)
        if (outcome.code, outcome.reason) != (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    ]
    report(failures, "forged identities not refused")
    assert changed_rows(before, await hostile.snapshot(exclude=(), since=since)) == {}
    await hostile.assert_healthy()

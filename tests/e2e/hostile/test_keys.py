"""Keys at the gateway: malformed bearer headers, a revoked key, a suspended tenant's key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from strata.admin.v1 import admin_pb2
from strata.internal.v1 import internal_pb2
from strata.tenants.v1 import tenants_pb2

from shared.api.callers import OPERATOR_SCOPE
from tests.e2e.hostile.names import REVOKED, SUSPENDED
from tests.e2e.hostile.rpcs import BY_ID, PROBES, request_for
from tests.e2e.hostile.stage import OK, Hostile, Metadata, Outcome, make_tenant, report
from tests.support.calls import bearer

pytestmark = pytest.mark.e2e


def test_keys_carry_no_expiry_so_there_is_no_expired_key_to_try() -> None:
    # If keys ever get an expiry, this suite needs an expired-key case.
    for message_type in (admin_pb2.ApiKey, admin_pb2.CreateApiKeyRequest):
        names = [f.name for f in message_type.DESCRIPTOR.fields]
        assert not [n for n in names if "expir" in n or "ttl" in n or "valid_until" in n], names


async def _probe_all(hostile: Hostile, metadata: Metadata) -> dict[str, Outcome]:
    """One normal call per upstream through the gateway with ``metadata``."""
    rpcs = [BY_ID[probe] for probe in PROBES]
    outcomes = await asyncio.gather(
        *(
            hostile.call(rpc, request_for(rpc).SerializeToString(), "gateway", metadata=metadata)
            for rpc in rpcs
        )
    )
    return {rpc.id: outcome for rpc, outcome in zip(rpcs, outcomes, strict=True)}


async def test_malformed_bearer_headers_are_unauthenticated_everywhere(hostile: Hostile) -> None:
    key = hostile.keys["kv"]
    other = hostile.keys["admin"]
    key_id, secret = key.split("_", 2)[1:]
    variants: dict[str, Metadata] = {
        "no header": [],
        "empty": [("authorization", "")],
        "scheme only": [("authorization", "Bearer")],
        "scheme and spaces": [("authorization", "Bearer    ")],
        "another scheme": [("authorization", f"Basic {key}")],
        "no scheme": [("authorization", key)],
        "prefix only": [("authorization", "Bearer sk_")],
        "one character short": bearer(key[:-1]),
        "one character more": bearer(key + "A"),
        "trailing words": [("authorization", f"Bearer {key} please")],
        "id not hex": bearer(f"sk_g{key_id[1:]}_{secret}"),
        "another key's secret": bearer(f"sk_{key_id}_{other.split('_', 2)[2]}"),
        "SQL in the id": bearer("sk_' OR 1=1 --_" + secret),
        "4 KiB of junk": bearer("A" * 4096),
        "a bad header before a good one": [
            ("authorization", "Bearer junk"),
            ("authorization", f"Bearer {key}"),
        ],
    }
    failures = []
    for name, metadata in variants.items():
        for probe, outcome in (await _probe_all(hostile, metadata)).items():
            if outcome.code != grpc.StatusCode.UNAUTHENTICATED or outcome.reason not in (
                "MISSING_API_KEY",
                "INVALID_API_KEY",
            ):
                failures.append(f"{name} on {probe}: {outcome.code.name} {outcome.reason}")
    report(failures, "malformed keys not refused")
    # The control: the same key, well presented (the scheme is case-insensitive), works.
    controls = await _probe_all(hostile, [("authorization", f"bearer {key}")])
    assert {probe: o.code for probe, o in controls.items()} == dict.fromkeys(PROBES, OK)


async def _until(predicate: Callable[[], Any], limit_s: float) -> float:
    """Seconds until the coroutine function ``predicate`` returns true; fails after ``limit_s``."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < limit_s, f"not within {limit_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_revoked_key_is_refused_by_every_service_within_a_second_for_good(hostile: Hostile) -> None:
    key = await make_tenant(hostile.gateway, hostile.keys["admin"], REVOKED, OPERATOR_SCOPE)
    assert {p: o.code for p, o in (await _probe_all(hostile, bearer(key))).items()} == dict.fromkeys(
        PROBES, OK
    )
    revoke = admin_pb2.RevokeApiKeyRequest(key_id=key.split("_")[1])
    outcome = await hostile.call(BY_ID["ApiKeyService.RevokeApiKey"], revoke.SerializeToString(), "gateway")
    assert outcome.code == OK, outcome

    async def refused_everywhere() -> bool:
        outcomes = await _probe_all(hostile, bearer(key))
        return all(o.code == grpc.StatusCode.UNAUTHENTICATED for o in outcomes.values())

    assert await _until(refused_everywhere, 2.0) <= 1.5  # the gateway's key cache: 1 s
    await asyncio.sleep(1.2)  # past the cache again: still refused, not re-learnt as valid
    assert await refused_everywhere()
    check = BY_ID["ApiKeyAuthService.AuthenticateApiKey"]
    outcome = await hostile.call(
        check, internal_pb2.AuthenticateApiKeyRequest(api_key=key).SerializeToString(), "direct"
    )
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")


async def test_a_suspended_tenants_key_is_refused_by_every_service(hostile: Hostile) -> None:
    key = await make_tenant(hostile.gateway, hostile.keys["admin"], SUSPENDED, OPERATOR_SCOPE)
    assert {p: o.code for p, o in (await _probe_all(hostile, bearer(key))).items()} == dict.fromkeys(
        PROBES, OK
    )
    update = tenants_pb2.UpdateTenantRequest(
        tenant=tenants_pb2.Tenant(slug=SUSPENDED, status=tenants_pb2.TENANT_STATUS_SUSPENDED)
    )
    update.update_mask.paths.append("status")
    outcome = await hostile.call(BY_ID["TenantService.UpdateTenant"], update.SerializeToString(), "gateway")
    assert outcome.code == OK, outcome

    async def refused_everywhere() -> bool:
        outcomes = (await _probe_all(hostile, bearer(key))).values()
        return all(
            (o.code, o.reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_SUSPENDED") for o in outcomes
        )

    await _until(refused_everywhere, 2.0)

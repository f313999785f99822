"""Filters and JSON documents nested far beyond every limit (10,000 deep): INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from tests.e2e.hostile.rpcs import RPCS, Rpc, params, request_for
from tests.e2e.hostile.stage import Hostile, report
from tests.e2e.hostile.wire import deep_filter, deep_struct, embed, message_paths

pytestmark = pytest.mark.e2e


FILTER_RPCS = [rpc for rpc in RPCS if any(message_paths(rpc.method.input_type, "strata.common.v1.Filter"))]
STRUCT_RPCS = [rpc for rpc in RPCS if any(message_paths(rpc.method.input_type, "google.protobuf.Struct"))]


@pytest.mark.parametrize("rpc", params(FILTER_RPCS))
async def test_filters_nested_beyond_every_limit_are_invalid_argument(hostile: Hostile, rpc: Rpc) -> None:
    # 9: one past Strata's own limit (8). 60: past protobuf's recursion limit (100 messages;
    # each level is two). 10,000: what the brief asks, and far past both.
    request = request_for(rpc)
    jobs = [
        (path, depth)
        for path in message_paths(rpc.method.input_type, "strata.common.v1.Filter")
        for depth in (9, 60, 10_000)
    ]
    bodies = [embed(request, path, deep_filter(depth)) for path, depth in jobs]
    failures = [
        f"{label} {'.'.join(jobs[int(label.split('#')[1])][0])} x{jobs[int(label.split('#')[1])][1]}: {outcome.code.name} {outcome.details[:80]}"
        for label, outcome in await hostile.both(rpc, bodies)
        if (outcome.code, outcome.reason) != (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    ]
    report(failures, "deep filters not refused")
    await hostile.assert_healthy()


@pytest.mark.parametrize("rpc", params(STRUCT_RPCS))
async def test_json_nested_beyond_protobufs_limit_is_invalid_argument(hostile: Hostile, rpc: Rpc) -> None:
    # A Struct level is three messages (Struct, map entry, Value): 40 levels is past protobuf's
    # 100, and 10,000 far past it. Both must be refused before anything is stored.
    request = request_for(rpc)
    jobs = [
        (path, depth)
        for path in message_paths(rpc.method.input_type, "google.protobuf.Struct")
        for depth in (40, 10_000)
    ]
    bodies = [embed(request, path, deep_struct(depth)) for path, depth in jobs]
    failures = [
        f"{label}: {outcome.code.name} {outcome.reason} {outcome.violations}"
        for label, outcome in await hostile.both(rpc, bodies)
        if (outcome.code, outcome.violations) != (grpc.StatusCode.INVALID_ARGUMENT, ("request",))
    ]
    report(failures, "deep JSON not refused")
    await hostile.assert_healthy()

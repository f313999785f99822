"""KvService through the real gateway, checked step by step against an in-memory model (hypothesis stateful).

Random sequences of Put (plain, compare-and-set, with a long TTL), BatchPut,
Get, BatchGet, Delete (one key, compare-and-set, prefix) and paged List run
against a fresh namespace; every answer is compared with what kv.proto says a
single copy of the store would answer. One rule races several compare-and-set
writers on one key: exactly one may win per expected revision, and the model
follows the winner.

Store revisions are global (other keys and tenants take them too), so the
model never predicts their numbers: it learns each write's revision from its
answer and checks the order (every write's revision is above every earlier
one) and the per-key bookkeeping (create_revision, mod_revision, version).

Hypothesis stateful tests are synchronous, so the machine runs in a worker
thread over a sync gRPC channel; the session's event loop stays free to read
the launcher's output (a blocked loop would let that pipe fill up).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from tests.support.errors import error_info
from tests.support.models import run_model_at_gateway

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_S = 10.0
MAX_EXAMPLES = 25
STEPS = 30
TTL_S = 3600  # long enough never to pass during the test: only its bookkeeping is checked
# Code point order is UTF-8 byte order; "é" and the emoji sort after every ASCII key.
KEYS = ["a", "ab", "abc", "b", "b/1", "b/2", "z", "é", "\U0001f600"]
PREFIXES = ["", "a", "ab", "b/", "b", "é", "q"]
keys = st.sampled_from(KEYS)
values = st.binary(max_size=24)
content_types = st.sampled_from(["", "text/plain", "application/json"])


@dataclass(frozen=True)
class Live:
    """One live key as the model holds it."""

    value: bytes
    content_type: str
    create_revision: int
    mod_revision: int
    version: int
    with_ttl: bool


def assert_kv(kv: kv_pb2.KeyValue, namespace: str, key: str, live: Live, *, with_value: bool = True) -> None:
    """``kv`` is ``live`` (the value left out where the API leaves it out)."""
    assert (kv.namespace, kv.key) == (namespace, key)
    assert kv.value == (live.value if with_value else b""), key
    assert kv.content_type == live.content_type, key
    assert (kv.create_revision, kv.mod_revision, kv.version) == (
        live.create_revision,
        live.mod_revision,
        live.version,
    ), key
    assert kv.HasField("expire_time") == live.with_ttl, key


def utf8_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


class KvModel(RuleBasedStateMachine):
    """One namespace of one tenant, driven through the gateway and mirrored in ``self.live``."""

    stub: kv_pb2_grpc.KvServiceStub
    metadata: tuple[tuple[str, str], ...]

    def __init__(self) -> None:
        super().__init__()
        self.namespace = f"model-{uuid.uuid4().hex[:12]}"
        self.live: dict[str, Live] = {}
        self.revision = 0  # the newest write revision seen
        self.seen_revisions: set[int] = set()  # for stale compare-and-set attempts

    # -- helpers -------------------------------------------------------------

    def call(self, method: str, request: object) -> object:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)

    def refused(self, method: str, request: object) -> grpc.RpcError:
        try:
            self.call(method, request)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"{method} {request!r} succeeded; the model expected a refusal")

    def wrote(self, revision: int) -> None:
        """A write at ``revision`` was acknowledged: it must follow every earlier one."""
        assert revision > self.revision, (revision, self.revision)
        self.revision = revision
        self.seen_revisions.add(revision)

    def current(self, key: str) -> int:
        live = self.live.get(key)
        return 0 if live is None else live.mod_revision

    def after_put(self, key: str, value: bytes, content_type: str, revision: int, ttl: bool) -> Live:
        before = self.live.get(key)
        return Live(
            value,
            content_type,
            before.create_revision if before else revision,
            revision,
            before.version + 1 if before else 1,
            ttl,
        )

    def assert_mismatch(self, error: grpc.RpcError, key: str, expected: int) -> None:
        assert error.code() == grpc.StatusCode.ABORTED, error
        info = error_info(error)
        assert info.reason == "REVISION_MISMATCH"
        assert info.metadata["key"] == key
        assert info.metadata["expected_revision"] == str(expected)
        assert info.metadata["current_revision"] == str(self.current(key))

    def if_revision_for(self, key: str, choice: str, other: int) -> int:
        if choice == "current":
            return self.current(key)
        if choice == "absent":
            return 0
        if choice == "stale" and self.seen_revisions:
            return min(self.seen_revisions)  # the oldest write of this run: rarely current
        return other

    # -- writes --------------------------------------------------------------

    @rule(
        key=keys,
        value=values,
        content_type=content_types,
        ttl=st.booleans(),
        return_previous=st.booleans(),
    )
    def put(self, key: str, value: bytes, content_type: str, ttl: bool, return_previous: bool) -> None:
        request = kv_pb2.PutRequest(
            namespace=self.namespace,
            key=key,
            value=value,
            content_type=content_type,
            return_previous=return_previous,
        )
        if ttl:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=TTL_S))
        started = time.time()
        response = self.call("Put", request)
        self.check_put(response, key, value, content_type, ttl, return_previous)
        if ttl:
            expires = response.kv.expire_time.ToNanoseconds() / 1e9
            assert started + TTL_S - 5 <= expires <= time.time() + TTL_S + 5

    def check_put(
        self,
        response: kv_pb2.PutResponse,
        key: str,
        value: bytes,
        content_type: str,
        ttl: bool,
        return_previous: bool,
    ) -> None:
        revision = response.header.revision
        self.wrote(revision)
        after = self.after_put(key, value, content_type, revision, ttl)
        assert_kv(response.kv, self.namespace, key, after, with_value=False)  # the caller has the value
        before = self.live.get(key)
        if return_previous and before is not None:
            assert_kv(response.previous, self.namespace, key, before)
        else:
            assert not response.HasField("previous")
        self.live[key] = after

    @rule(
        key=keys,
        value=values,
        choice=st.sampled_from(["current", "current", "absent", "stale", "other"]),
        other=st.integers(1, 1 << 40),
        return_previous=st.booleans(),
    )
    def compare_and_put(self, key: str, value: bytes, choice: str, other: int, return_previous: bool) -> None:
        expected = self.if_revision_for(key, choice, other)
        request = kv_pb2.PutRequest(
            namespace=self.namespace,
            key=key,
            value=value,
            if_revision=expected,
            return_previous=return_previous,
        )
        if expected != self.current(key):
            self.assert_mismatch(self.refused("Put", request), key, expected)
            return
        response = self.call("Put", request)
        self.check_put(response, key, value, "", False, return_previous)

    @rule(
        items=st.lists(
            st.tuples(keys, values, st.sampled_from(["none", "none", "current", "absent", "other"])),
            min_size=1,
            max_size=5,
            unique_by=lambda item: item[0],
        )
    )
    def batch_put(self, items: list[tuple[str, bytes, str]]) -> None:
        request = kv_pb2.BatchPutRequest(namespace=self.namespace)
        conflict: tuple[str, int] | None = None
        for key, value, choice in items:
            item = kv_pb2.BatchPutItem(key=key, value=value)
            if choice != "none":
                item.if_revision = self.if_revision_for(key, choice, 1 << 41)
                if item.if_revision != self.current(key) and conflict is None:
                    conflict = (key, item.if_revision)
            request.items.append(item)
        if conflict is not None:
            # All or none: nothing is written, and the first conflicting key is named.
            self.assert_mismatch(self.refused("BatchPut", request), *conflict)
            return
        response = self.call("BatchPut", request)
        revision = response.header.revision
        self.wrote(revision)
        assert len(response.kvs) == len(items)
        for kv, (key, value, _) in zip(response.kvs, items, strict=True):
            after = self.after_put(key, value, "", revision, False)
            assert_kv(kv, self.namespace, key, after, with_value=False)
            self.live[key] = after

    @rule(
        key=keys,
        choice=st.sampled_from(["none", "none", "current", "absent", "stale", "other"]),
        other=st.integers(1, 1 << 40),
        return_previous=st.booleans(),
    )
    def delete(self, key: str, choice: str, other: int, return_previous: bool) -> None:
        request = kv_pb2.DeleteRequest(namespace=self.namespace, key=key, return_previous=return_previous)
        if choice != "none":
            request.if_revision = self.if_revision_for(key, choice, other)
            if request.if_revision != self.current(key):
                self.assert_mismatch(self.refused("Delete", request), key, request.if_revision)
                return
        response = self.call("Delete", request)
        before = self.live.pop(key, None)
        self.check_delete(response, {key: before} if before else {}, return_previous)

    @rule(prefix=st.sampled_from(PREFIXES), return_previous=st.booleans())
    def delete_prefix(self, prefix: str, return_previous: bool) -> None:
        request = kv_pb2.DeleteRequest(
            namespace=self.namespace, prefix=prefix, return_previous=return_previous
        )
        response = self.call("Delete", request)
        gone = {k: v for k, v in self.live.items() if k.startswith(prefix)}
        for key in gone:
            del self.live[key]
        self.check_delete(response, gone, return_previous)

    def check_delete(
        self, response: kv_pb2.DeleteResponse, gone: dict[str, Live], return_previous: bool
    ) -> None:
        assert response.deleted == len(gone)
        if gone:
            self.wrote(response.header.revision)  # one revision for the whole delete
        else:
            assert response.header.revision >= self.revision  # the current one: nothing consumed
        if return_previous:
            previous = {kv.key: kv for kv in response.previous}
            assert previous.keys() == gone.keys()
            for key, before in gone.items():
                assert_kv(previous[key], self.namespace, key, before)
        else:
            assert not response.previous

    @rule(key=keys, writers=st.integers(2, 6), deleters=st.integers(0, 2))
    def racing_compare_and_set(self, key: str, writers: int, deleters: int) -> None:
        """Several callers compare-and-set one key against the same revision at once: one wins."""
        expected = self.current(key)
        if expected == 0:
            deleters = 0  # a compare-and-delete of an absent key deletes nothing and "wins" trivially
        barrier = threading.Barrier(writers + deleters)

        def attempt(i: int) -> tuple[int, object]:
            if i < writers:
                request: object = kv_pb2.PutRequest(
                    namespace=self.namespace, key=key, value=f"racer-{i}".encode(), if_revision=expected
                )
                method = "Put"
            else:
                request = kv_pb2.DeleteRequest(namespace=self.namespace, key=key, if_revision=expected)
                method = "Delete"
            barrier.wait(timeout=CALL_TIMEOUT_S)
            try:
                return i, self.call(method, request)
            except grpc.RpcError as exc:
                return i, exc

        with ThreadPoolExecutor(writers + deleters) as pool:
            outcomes = list(pool.map(attempt, range(writers + deleters)))
        winners = [(i, r) for i, r in outcomes if not isinstance(r, grpc.RpcError)]
        losers = [r for _, r in outcomes if isinstance(r, grpc.RpcError)]
        assert len(winners) == 1, outcomes
        index, response = winners[0]
        if index < writers:
            assert isinstance(response, kv_pb2.PutResponse)
            self.check_put(response, key, f"racer-{index}".encode(), "", False, False)
        else:
            assert isinstance(response, kv_pb2.DeleteResponse)
            before = self.live.pop(key)
            self.check_delete(response, {key: before}, False)
        for error in losers:
            # Each loser compared against the old revision and saw the winner's state.
            self.assert_mismatch(error, key, expected)

    # -- reads ---------------------------------------------------------------

    @rule(key=keys)
    def get(self, key: str) -> None:
        request = kv_pb2.GetRequest(namespace=self.namespace, key=key)
        live = self.live.get(key)
        if live is None:
            error = self.refused("Get", request)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(error).reason == "KEY_NOT_FOUND"
            return
        response = self.call("Get", request)
        assert_kv(response.kv, self.namespace, key, live)
        assert response.header.revision >= live.mod_revision

    @rule(asked=st.lists(keys, min_size=1, max_size=8))
    def batch_get(self, asked: list[str]) -> None:
        response = self.call("BatchGet", kv_pb2.BatchGetRequest(namespace=self.namespace, keys=asked))
        unique = list(dict.fromkeys(asked))  # duplicates are answered once, in the order asked
        assert [kv.key for kv in response.kvs] == [k for k in unique if k in self.live]
        assert list(response.missing_keys) == [k for k in unique if k not in self.live]
        for kv in response.kvs:
            assert_kv(kv, self.namespace, kv.key, self.live[kv.key])
            assert response.header.revision >= kv.mod_revision

    @rule(
        prefix=st.sampled_from(PREFIXES),
        start_key=st.sampled_from(["", "ab", "b", "b/2", "é"]),
        end_key=st.sampled_from(["", "b", "b/2", "z", "\U0001f600"]),
        page_size=st.integers(1, 4),
        keys_only=st.booleans(),
        include_total_size=st.booleans(),
    )
    def list_pages(
        self,
        prefix: str,
        start_key: str,
        end_key: str,
        page_size: int,
        keys_only: bool,
        include_total_size: bool,
    ) -> None:
        expected = utf8_order(
            [
                k
                for k in self.live
                if k.startswith(prefix)
                and k.encode() >= start_key.encode()
                and (not end_key or k.encode() < end_key.encode())
            ]
        )
        listed: list[kv_pb2.KeyValue] = []
        token = ""
        for _ in range(len(KEYS) + 2):
            page = self.call(
                "List",
                kv_pb2.ListRequest(
                    namespace=self.namespace,
                    prefix=prefix,
                    start_key=start_key,
                    end_key=end_key,
                    page_size=page_size,
                    page_token=token,
                    keys_only=keys_only,
                    include_total_size=include_total_size,
                ),
            )
            assert len(page.kvs) <= page_size
            assert page.total_size == (len(expected) if include_total_size else 0)
            listed.extend(page.kvs)
            token = page.next_page_token
            if not token:
                break
        else:
            raise AssertionError("List never reached its last page")
        assert [kv.key for kv in listed] == expected
        for kv in listed:
            assert_kv(kv, self.namespace, kv.key, self.live[kv.key], with_value=not keys_only)

    @invariant()
    def revisions_are_consistent(self) -> None:
        for live in self.live.values():
            assert live.create_revision <= live.mod_revision <= self.revision
            assert live.version >= 1


def run_model(gateway: str, api_key: str) -> None:
    run_model_at_gateway(
        KvModel, kv_pb2_grpc.KvServiceStub, gateway, api_key, max_examples=MAX_EXAMPLES, steps=STEPS
    )


async def test_kv_answers_match_the_model(stack, make_key):
    api_key, _ = await make_key(f"kvm-{uuid.uuid4().hex[:10]}", "kv:read", "kv:write")
    started = time.monotonic()
    await asyncio.to_thread(run_model, stack.gateway, api_key)
    print(f"kv model: {MAX_EXAMPLES} runs x up to {STEPS} steps in {time.monotonic() - started:.1f} s")

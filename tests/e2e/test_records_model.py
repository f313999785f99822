"""RecordService through the real gateway, checked step by step against an in-memory model (hypothesis stateful).

Random sequences of CreateRecord (with and without id, with and without a
request_id to retry), GetRecord, BatchGetRecords, UpdateRecord (full replace
or FieldMask paths, with the current etag, a stale one or none), DeleteRecord
(with or without etag) and filtered, paged ListRecords run for a fresh tenant;
every answer is compared with what tenants.proto says.

Like test_kv_model.py, the machine runs in a worker thread over a sync gRPC
channel so the session's event loop keeps reading the launcher's output.

Two behaviours the machine once found contradicting the proto have their own
tests at the end as well (etag reuse after delete and re-create; a removed
nested mask path that left an empty parent).
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
)
from strata.common.v1 import filter_pb2
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from tests.support.calls import bearer
from tests.support.documents import struct
from tests.support.errors import error_info
from tests.support.models import run_model_at_gateway

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_S = 10.0
MAX_EXAMPLES = 25
STEPS = 30
SCOPES = ("tenants:read", "tenants:write")
collections = st.sampled_from(["notes", "tasks"])
ids = st.sampled_from(["r1", "r2", "r3", "r4"])
request_ids = st.sampled_from(["", "", "q1", "q2", "q3"])
documents = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(0, 3),
        "tag": st.sampled_from(["x", "y", "xy"]),
        "nested": st.fixed_dictionaries(
            {}, optional={"a": st.integers(0, 2), "b": st.sampled_from(["", "p", "q"])}
        ),
    },
)
MASKS: list[list[str] | None] = [
    None,
    [],
    ["data"],
    ["data.n"],
    ["data.tag"],
    ["data.nested.a"],
    ["data.n", "data.nested"],
    ["data.nested.b", "data.tag"],
]
Document = dict[str, Any]
Value = Any  # a JSON value
Cond = filter_pb2.Condition
Op = filter_pb2.Operator


def jsonish(value: Any) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())


@dataclass
class Stored:
    """One record as the model holds it."""

    data: Document
    revision: int
    etag: str
    request_id: str
    create_time: timestamp_pb2.Timestamp
    update_time: timestamp_pb2.Timestamp
    etags: list[str] = field(default_factory=list)  # every etag of this incarnation, oldest first


def lookup(document: Document, path: list[str]) -> tuple[bool, Value]:
    """(present, value) of ``path`` in ``document``."""
    node: Value = document
    for segment in path:
        if not isinstance(node, dict) or segment not in node:
            return False, None
        node = node[segment]
    return True, node


def apply_mask(current: Document, incoming: Document, paths: list[str] | None) -> Document:
    """tenants.proto: replace all of data, or set each masked path from incoming / remove it where absent."""
    if not paths or "data" in paths:
        return copy.deepcopy(incoming)
    result = copy.deepcopy(current)
    for mask_path in paths:
        path = mask_path.removeprefix("data.").split(".")
        present, value = lookup(incoming, path)
        if present:
            node = result
            for segment in path[:-1]:
                if not isinstance(node.get(segment), dict):
                    node[segment] = {}
                node = node[segment]
            node[path[-1]] = copy.deepcopy(value)
        else:
            found, parent = lookup(result, path[:-1])
            if found and isinstance(parent, dict):
                parent.pop(path[-1], None)
    return result


# Filters and the documents they match (the model's reading of strata.common.v1.Filter).
FILTERS: dict[str, tuple[filter_pb2.Filter | None, Any]] = {
    "all": (None, lambda d: True),
    "n == 2": (
        filter_pb2.Filter(condition=Cond(path="n", op=Op.OPERATOR_EQ, value=jsonish(2))),
        lambda d: d.get("n") == 2,
    ),
    "n >= 1": (
        filter_pb2.Filter(condition=Cond(path="n", op=Op.OPERATOR_GTE, value=jsonish(1))),
        lambda d: "n" in d and d["n"] >= 1,
    ),
    "tag in (x, xy)": (
        filter_pb2.Filter(
            condition=Cond(path="tag", op=Op.OPERATOR_IN, values=[jsonish("x"), jsonish("xy")])
        ),
        lambda d: d.get("tag") in ("x", "xy"),
    ),
    "tag starts with x": (
        filter_pb2.Filter(condition=Cond(path="tag", op=Op.OPERATOR_PREFIX, value=jsonish("x"))),
        lambda d: str(d.get("tag", "")).startswith("x"),
    ),
    "nested.a exists and tag == y": (
        filter_pb2.Filter(
            all_of=filter_pb2.FilterList(
                filters=[
                    filter_pb2.Filter(condition=Cond(path="nested.a", op=Op.OPERATOR_EXISTS)),
                    filter_pb2.Filter(condition=Cond(path="tag", op=Op.OPERATOR_EQ, value=jsonish("y"))),
                ]
            )
        ),
        lambda d: lookup(d, ["nested", "a"])[0] and d.get("tag") == "y",
    ),
}


class RecordsModel(RuleBasedStateMachine):
    """One tenant's records, driven through the gateway and mirrored in ``self.records``."""

    stub: tenants_pb2_grpc.RecordServiceStub
    metadata: tuple[tuple[str, str], ...]
    # (collection, id) of records created in this run, so that later steps mostly
    # reach records that exist (or did: deleted ones stay and test NOT_FOUND).
    created = Bundle("created")

    def __init__(self) -> None:
        super().__init__()
        # Every run gets collections of its own (the tenant is shared by the runs).
        self.prefix = uuid.uuid4().hex[:8]
        self.records: dict[tuple[str, str], Stored] = {}

    # -- helpers -------------------------------------------------------------

    def coll(self, name: str) -> str:
        return f"{name}-{self.prefix}"

    def call(self, method: str, request: object) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)

    def refused(self, method: str, request: object, code: grpc.StatusCode, reason: str) -> grpc.RpcError:
        try:
            self.call(method, request)
        except grpc.RpcError as exc:
            assert exc.code() == code, exc
            assert error_info(exc).reason == reason
            return exc
        raise AssertionError(f"{method} {request!r} succeeded; the model expected {code.name}")

    def assert_record(self, record: tenants_pb2.Record, collection: str, record_id: str) -> None:
        stored = self.records[(collection, record_id)]
        assert (record.collection, record.id) == (collection, record_id)
        assert json_format.MessageToDict(record.data) == stored.data, record_id
        assert (record.revision, record.etag) == (stored.revision, stored.etag), record_id
        assert record.create_time == stored.create_time, record_id
        assert record.update_time == stored.update_time, record_id

    def by_request_id(self, collection: str, request_id: str) -> str | None:
        if not request_id:
            return None
        for (c, record_id), stored in self.records.items():
            if c == collection and stored.request_id == request_id:
                return record_id
        return None

    def etag_for(self, stored: Stored | None, choice: str) -> str:
        if stored is None or choice == "none":
            return ""
        if choice == "stale" and len(stored.etags) > 1:
            return stored.etags[0]
        if choice == "bogus":
            return "r999999"
        return stored.etag

    # -- writes --------------------------------------------------------------

    @rule(
        target=created,
        collection=collections,
        record_id=ids | st.just(""),
        data=documents,
        request_id=request_ids,
    )
    def create(self, collection: str, record_id: str, data: Document, request_id: str) -> object:
        coll = self.coll(collection)
        request = tenants_pb2.CreateRecordRequest(
            record=tenants_pb2.Record(collection=coll, id=record_id, data=struct(data)),
            request_id=request_id,
        )
        retried = self.by_request_id(coll, request_id)
        if retried is not None:
            # A retried request answers the record its first attempt created, whatever else it says.
            self.assert_record(self.call("CreateRecord", request).record, coll, retried)
            return multiple()
        if record_id and (coll, record_id) in self.records:
            error = self.refused(
                "CreateRecord", request, grpc.StatusCode.ALREADY_EXISTS, "RECORD_ALREADY_EXISTS"
            )
            assert error_info(error).metadata["id"] == record_id
            return multiple()
        made = self.call("CreateRecord", request).record
        if not record_id:
            assert uuid.UUID(made.id)  # a generated id is a UUID
            record_id = made.id
        assert made.revision == 1 and made.etag
        assert made.create_time == made.update_time
        self.records[(coll, record_id)] = Stored(
            data, 1, made.etag, request_id, made.create_time, made.update_time, [made.etag]
        )
        self.assert_record(made, coll, record_id)
        return (collection, record_id)

    @rule(
        ref=created | st.tuples(collections, ids),
        data=documents,
        mask=st.sampled_from(MASKS),
        etag=st.sampled_from(["none", "current", "current", "stale", "bogus"]),
    )
    def update(self, ref: tuple[str, str], data: Document, mask: list[str] | None, etag: str) -> None:
        collection, record_id = ref
        coll = self.coll(collection)
        stored = self.records.get((coll, record_id))
        request = tenants_pb2.UpdateRecordRequest(
            record=tenants_pb2.Record(
                collection=coll, id=record_id, data=struct(data), etag=self.etag_for(stored, etag)
            )
        )
        if mask is not None:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=mask))
        if stored is None:
            self.refused("UpdateRecord", request, grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND")
            return
        if request.record.etag and request.record.etag != stored.etag:
            self.refused("UpdateRecord", request, grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
            return
        updated = self.call("UpdateRecord", request).record
        assert updated.etag not in stored.etags  # a new etag on every update
        assert updated.create_time == stored.create_time
        assert updated.update_time.ToNanoseconds() >= stored.update_time.ToNanoseconds()
        stored.data = apply_mask(stored.data, data, mask)
        stored.revision += 1
        stored.etag = updated.etag
        stored.etags.append(updated.etag)
        stored.update_time = updated.update_time
        self.assert_record(updated, coll, record_id)

    @rule(
        ref=created | st.tuples(collections, ids),
        etag=st.sampled_from(["none", "current", "stale", "bogus"]),
    )
    def delete(self, ref: tuple[str, str], etag: str) -> None:
        collection, record_id = ref
        coll = self.coll(collection)
        stored = self.records.get((coll, record_id))
        request = tenants_pb2.DeleteRecordRequest(
            collection=coll, id=record_id, etag=self.etag_for(stored, etag)
        )
        if stored is None:
            self.refused("DeleteRecord", request, grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND")
            return
        if request.etag and request.etag != stored.etag:
            self.refused("DeleteRecord", request, grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
            return
        removed = self.call("DeleteRecord", request).record
        self.assert_record(removed, coll, record_id)  # the record as it was
        del self.records[(coll, record_id)]

    # -- reads ---------------------------------------------------------------

    @rule(ref=created | st.tuples(collections, ids))
    def get(self, ref: tuple[str, str]) -> None:
        collection, record_id = ref
        coll = self.coll(collection)
        request = tenants_pb2.GetRecordRequest(collection=coll, id=record_id)
        if (coll, record_id) not in self.records:
            self.refused("GetRecord", request, grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND")
            return
        self.assert_record(self.call("GetRecord", request).record, coll, record_id)

    @rule(collection=collections, asked=st.lists(ids, min_size=1, max_size=4, unique=True))
    def batch_get(self, collection: str, asked: list[str]) -> None:
        coll = self.coll(collection)
        response = self.call(
            "BatchGetRecords", tenants_pb2.BatchGetRecordsRequest(collection=coll, ids=asked)
        )
        assert [r.id for r in response.records] == [i for i in asked if (coll, i) in self.records]
        assert list(response.missing_ids) == [i for i in asked if (coll, i) not in self.records]
        for record in response.records:
            self.assert_record(record, coll, record.id)

    @rule(
        collection=collections,
        which=st.sampled_from(sorted(FILTERS)),
        descending=st.booleans(),
        page_size=st.integers(1, 3),
        include_total_size=st.booleans(),
    )
    def list_records(
        self, collection: str, which: str, descending: bool, page_size: int, include_total_size: bool
    ) -> None:
        coll = self.coll(collection)
        filter_message, matches = FILTERS[which]
        expected = sorted(
            (i for (c, i), stored in self.records.items() if c == coll and matches(stored.data)),
            reverse=descending,
        )
        seen: list[tenants_pb2.Record] = []
        token = ""
        for _ in range(len(self.records) + 2):
            request = tenants_pb2.ListRecordsRequest(
                collection=coll,
                order_by="id desc" if descending else "id",
                page_size=page_size,
                page_token=token,
                include_total_size=include_total_size,
            )
            if filter_message is not None:
                request.filter.CopyFrom(filter_message)
            page = self.call("ListRecords", request)
            assert len(page.records) <= page_size
            assert page.total_size == (len(expected) if include_total_size else 0)
            seen.extend(page.records)
            token = page.next_page_token
            if not token:
                break
        else:
            raise AssertionError("ListRecords never reached its last page")
        assert [r.id for r in seen] == expected, which
        for record in seen:
            self.assert_record(record, coll, record.id)

    @invariant()
    def revisions_count_updates(self) -> None:
        for stored in self.records.values():
            assert stored.revision == len(stored.etags) >= 1


def run_model(gateway: str, api_key: str) -> None:
    run_model_at_gateway(
        RecordsModel,
        tenants_pb2_grpc.RecordServiceStub,
        gateway,
        api_key,
        max_examples=MAX_EXAMPLES,
        steps=STEPS,
    )


async def test_records_answers_match_the_model(stack, make_key):
    api_key, _ = await make_key(f"rm-{uuid.uuid4().hex[:10]}", *SCOPES)
    started = time.monotonic()
    await asyncio.to_thread(run_model, stack.gateway, api_key)
    print(f"records model: {MAX_EXAMPLES} runs x up to {STEPS} steps in {time.monotonic() - started:.1f} s")


# -- behaviours that once contradicted tenants.proto ---------------------------


def _records(stack_gateway: str, api_key: str) -> tuple[grpc.Channel, tenants_pb2_grpc.RecordServiceStub]:
    channel = grpc.insecure_channel(stack_gateway)
    return channel, tenants_pb2_grpc.RecordServiceStub(channel)


async def test_an_etag_of_a_deleted_record_does_not_fit_its_re_created_successor(stack, make_key):
    api_key, _ = await make_key(f"rm-{uuid.uuid4().hex[:10]}", *SCOPES)

    def scenario() -> None:
        md = bearer(api_key)
        channel, stub = _records(stack.gateway, api_key)
        with channel:
            record = tenants_pb2.Record(collection="aba", id="doc", data=struct({"owner": "alice"}))
            old = stub.CreateRecord(tenants_pb2.CreateRecordRequest(record=record), metadata=md).record
            stub.DeleteRecord(tenants_pb2.DeleteRecordRequest(collection="aba", id="doc"), metadata=md)
            record.data.CopyFrom(struct({"owner": "bob"}))
            new = stub.CreateRecord(tenants_pb2.CreateRecordRequest(record=record), metadata=md).record
            assert new.etag != old.etag, f"both incarnations answer etag {new.etag!r}"
            with pytest.raises(grpc.RpcError) as caught:  # a writer still holding alice's etag
                stub.UpdateRecord(
                    tenants_pb2.UpdateRecordRequest(
                        record=tenants_pb2.Record(
                            collection="aba", id="doc", data=struct({"owner": "eve"}), etag=old.etag
                        )
                    ),
                    metadata=md,
                )
            assert caught.value.code() == grpc.StatusCode.ABORTED
            with pytest.raises(grpc.RpcError) as caught:  # nor may it delete bob's record
                stub.DeleteRecord(
                    tenants_pb2.DeleteRecordRequest(collection="aba", id="doc", etag=old.etag), metadata=md
                )
            assert caught.value.code() == grpc.StatusCode.ABORTED
            assert error_info(caught.value).reason == "ETAG_MISMATCH"

    await asyncio.to_thread(scenario)


async def test_removing_an_absent_nested_path_leaves_the_document_unchanged(stack, make_key):
    api_key, _ = await make_key(f"rm-{uuid.uuid4().hex[:10]}", *SCOPES)

    def scenario() -> None:
        md = bearer(api_key)
        channel, stub = _records(stack.gateway, api_key)
        with channel:
            record = tenants_pb2.Record(collection="mask", id="doc", data=struct({"n": 1}))
            stub.CreateRecord(tenants_pb2.CreateRecordRequest(record=record), metadata=md)
            updated = stub.UpdateRecord(
                tenants_pb2.UpdateRecordRequest(
                    record=tenants_pb2.Record(collection="mask", id="doc", data=struct({})),
                    update_mask=field_mask_pb2.FieldMask(paths=["data.a.b"]),
                ),
                metadata=md,
            ).record
            assert json_format.MessageToDict(updated.data) == {"n": 1}

    await asyncio.to_thread(scenario)

"""RecordService.ListRecords walked page by page through the gateway: every ordering, and writes mid-walk."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from google.protobuf import json_format
from strata.tenants.v1 import tenants_pb2

from tests.e2e.test_tenants import create
from tests.support.calls import bearer
from tests.support.documents import struct

pytestmark = pytest.mark.e2e

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def writer(make_key) -> Metadata:
    """Metadata of a key with tenants:read and tenants:write for a fresh tenant."""
    api_key, _ = await make_key(f"p-{uuid.uuid4().hex[:10]}", "tenants:read", "tenants:write")
    return bearer(api_key)


async def walk(
    gw_records, metadata: Metadata, request: tenants_pb2.ListRecordsRequest
) -> list[tenants_pb2.Record]:
    """Every record ``request`` lists, page after page until there is no next token."""
    found: list[tenants_pb2.Record] = []
    request = tenants_pb2.ListRecordsRequest.FromString(request.SerializeToString())  # a copy to page on
    while True:
        page = await gw_records.ListRecords(request, metadata=metadata, timeout=30)
        found.extend(page.records)
        if not page.next_page_token:
            return found
        request.page_token = page.next_page_token


# -- every ordering, paged ----------------------------------------------------

# Ties on both paths (broken by id) and records without them (last, in either direction).
# Strings are lower-case letters only: their order is the same in every collation.
ORDER_DOCS: dict[str, dict] = {
    "o00": {"n": 5, "s": "pear"},
    "o01": {"n": -1, "s": "apple"},
    "o02": {"n": 2.5, "s": "fig"},
    "o03": {"n": 5, "s": "kiwi"},
    "o04": {"s": "apple"},
    "o05": {"n": 0, "s": "plum"},
    "o06": {"n": 10},
    "o07": {"n": 2.5, "s": "date"},
    "o08": {"n": -7.25, "s": "fig"},
    "o09": {"s": "lime"},
    "o10": {"n": 3, "s": "apple"},
    "o11": {"n": 5, "s": "cherry"},
}
# Updated after all are created, in this order: update_time order differs from create_time order.
UPDATED = ("o07", "o02", "o10", "o00", "o05")


def time_key(field: str) -> Callable[[tenants_pb2.Record], object]:
    """The sort key of a record by one of its timestamps."""

    def key(record: tenants_pb2.Record) -> tuple[int, int]:
        stamp = getattr(record, field)
        return (stamp.seconds, stamp.nanos)

    return key


def path_key(name: str) -> Callable[[tenants_pb2.Record], object]:
    """The sort key of a record by a top-level key of its data; None where absent."""

    def key(record: tenants_pb2.Record) -> object:
        return json_format.MessageToDict(record.data).get(name)

    return key


SORT_KEYS = {
    "create_time": time_key("create_time"),
    "update_time": time_key("update_time"),
    "data.n": path_key("n"),
    "data.s": path_key("s"),
}


def expected_order(records: list[tenants_pb2.Record], key: Callable, descending: bool) -> list[str]:
    """Ids in (sort key NULLS LAST, id) order, as the API promises; descending reverses both but NULLS stay last."""
    present = sorted((key(r), r.id) for r in records if key(r) is not None)
    absent = sorted(r.id for r in records if key(r) is None)
    if descending:
        present.reverse()
        absent.reverse()
    return [record_id for _, record_id in present] + absent


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("order_by", list(SORT_KEYS))
async def test_every_ordering_walked_in_small_pages_gives_the_whole_order_once(
    gw_records, writer, order_by, descending
):
    for record_id, data in ORDER_DOCS.items():
        await create(gw_records, writer, "ordered", data, record_id)
    for record_id in UPDATED:
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(
                    collection="ordered", id=record_id, data=struct(ORDER_DOCS[record_id])
                )
            ),
            metadata=writer,
        )
    stored = await gw_records.BatchGetRecords(
        tenants_pb2.BatchGetRecordsRequest(collection="ordered", ids=list(ORDER_DOCS)), metadata=writer
    )
    expected = expected_order(list(stored.records), SORT_KEYS[order_by], descending)
    assert len(expected) == len(ORDER_DOCS)
    if order_by == "update_time":  # the updates reordered the records
        newest = expected[: len(UPDATED)][::-1] if descending else expected[-len(UPDATED) :]
        assert newest == list(UPDATED)
    for page_size in (1, 3, 5):
        walked = await walk(
            gw_records,
            writer,
            tenants_pb2.ListRecordsRequest(
                collection="ordered",
                order_by=f"{order_by} desc" if descending else order_by,
                page_size=page_size,
            ),
        )
        ids = [r.id for r in walked]
        assert ids == expected, f"page_size {page_size}"


# -- writes during the walk ---------------------------------------------------


async def test_a_walk_by_id_during_deletes_lists_every_record_that_stayed_exactly_once(gw_records, writer):
    everything = [f"d{i:03d}" for i in range(60)]
    victims = {record_id for i, record_id in enumerate(everything) if i % 3 == 0}
    for record_id in everything:
        await create(gw_records, writer, "churn", {"i": record_id}, record_id)
    remaining = sorted(victims)

    async def delete(record_id: str) -> None:
        await gw_records.DeleteRecord(
            tenants_pb2.DeleteRecordRequest(collection="churn", id=record_id), metadata=writer
        )

    request = tenants_pb2.ListRecordsRequest(collection="churn", order_by="id", page_size=4)
    page = await gw_records.ListRecords(request, metadata=writer)
    seen: list[str] = []
    deleted_mid_walk = 0
    while True:
        seen.extend(r.id for r in page.records)
        if not page.next_page_token:
            break
        last = page.records[-1].id
        # The row the token points at (when it is a victim), or one behind it, and two ahead:
        # deleted while the next page is read.
        behind = [last] if last in remaining else [v for v in remaining if v < last][:1]
        doomed = behind + [v for v in remaining if v > last][:2]
        for record_id in doomed:
            remaining.remove(record_id)
        deleted_mid_walk += len(doomed)
        request.page_token = page.next_page_token
        page, *_ = await asyncio.gather(
            gw_records.ListRecords(request, metadata=writer), *(delete(v) for v in doomed)
        )
    counts = Counter(seen)
    assert deleted_mid_walk >= 10, "the walk ended before the deletes it should overlap"
    assert set(counts) <= set(everything)
    assert [record_id for record_id, n in counts.items() if n > 1] == [], "listed twice"
    stayed = set(everything) - victims
    assert [record_id for record_id in sorted(stayed) if counts[record_id] != 1] == []
    assert seen == sorted(seen)


async def test_a_walk_by_update_time_during_updates_skips_nothing_unchanged_and_repeats_only_updated(
    gw_records, writer
):
    everything = [f"u{i:02d}" for i in range(32)]
    for record_id in everything:
        await create(gw_records, writer, "moving", {"v": 0}, record_id)

    async def update(record_id: str) -> None:
        await gw_records.UpdateRecord(
            tenants_pb2.UpdateRecordRequest(
                record=tenants_pb2.Record(collection="moving", id=record_id, data=struct({"v": 1}))
            ),
            metadata=writer,
        )

    request = tenants_pb2.ListRecordsRequest(collection="moving", order_by="update_time", page_size=4)
    page = await gw_records.ListRecords(request, metadata=writer)
    seen: list[str] = []
    updated: set[str] = set()
    updated_after_seen: list[str] = []
    while True:
        seen.extend(r.id for r in page.records)
        if not page.next_page_token:
            break
        # One record already listed and one not yet, each updated once, while the next page is read:
        # an update moves a record to the end of the update_time order.
        behind = [r for r in seen if r not in updated][:1]
        ahead = [r for r in everything if r not in seen and r not in updated][:1]
        doomed = behind + ahead
        updated.update(doomed)
        updated_after_seen.extend(behind)
        request.page_token = page.next_page_token
        page, *_ = await asyncio.gather(
            gw_records.ListRecords(request, metadata=writer), *(update(v) for v in doomed)
        )
    counts = Counter(seen)
    assert len(updated) >= 8, "the walk ended before the updates it should overlap"
    assert set(counts) <= set(everything)
    unchanged = [r for r in everything if r not in updated]
    assert [r for r in unchanged if counts[r] != 1] == [], "a record not updated was skipped or repeated"
    assert [r for r in updated if counts[r] > 2] == []
    # Keyset on a mutable key: a record updated after it was listed is listed again at the end.
    assert any(counts[r] == 2 for r in updated_after_seen), counts

"""KvService through the real gateway is linearizable per key: a recorded concurrent history, checked.

Eight client threads, each on its own connection, hammer four hot keys with
Get, Put, compare-and-set Put and (compare-and-set) Delete, each call with a
deadline, recording the monotonic time of every call and answer. A write
whose answer never came (DEADLINE_EXCEEDED, UNAVAILABLE, CANCELLED) may or
may not have landed (the group commit does not cancel a batch a caller gave
up on), so it is recorded as an unknown outcome. The history then goes
through tests/support/linearizability.py, which must find an order consistent with
real time and kv.proto's single-copy semantics for every key.

Two faults this check found have tests of their own at the end: Delete's
header.revision naming a later write's revision, and a write whose caller
gave up after its commit leaving the cache stale. SHORT_SHARE of the writes
get a deadline of a few milliseconds, so that unknown outcomes really occur.

The calls run in worker threads over sync channels, keeping the session's
event loop free to read the launcher's output.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from strata.kv.v1 import kv_pb2, kv_pb2_grpc

from tests.support.calls import bearer
from tests.support.errors import error_info
from tests.support.linearizability import (
    Aborted,
    Delete,
    Deleted,
    Entry,
    Found,
    Get,
    Operation,
    Output,
    Put,
    Written,
    check,
)

pytestmark = pytest.mark.e2e

CLIENTS = 8
KEYS = ("hot-0", "hot-1", "hot-2", "hot-3")
OPS = 1500  # in all; well under the gateway's default burst (2000), so none is rate limited
DEADLINE_S = 5.0
SHORT_DEADLINE_S = (0.001, 0.02)  # for a few writes: answers that never come
SHORT_SHARE = 0.05
# The call may have run: a write's outcome is unknown.
MAYBE_RAN = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def entry(kv: kv_pb2.KeyValue) -> Entry:
    return Entry(kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.content_type)


@dataclass
class Client:
    """One caller: its own connection, its own random stream, what it last saw of each key."""

    number: int
    stub: kv_pb2_grpc.KvServiceStub
    metadata: tuple[tuple[str, str], ...]
    namespace: str
    rng: random.Random
    known: dict[str, int] = field(default_factory=dict)  # key -> last mod_revision seen (0: absent)
    history: list[Operation] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    failure: BaseException | None = None  # raised in this client's thread, re-raised by record()
    seq: int = 0

    def request(self, key: str) -> tuple[str, object, Get | Put | Delete]:
        """A random call on ``key``: (method, request, the checker's input)."""
        self.seq += 1
        roll = self.rng.random()
        ns = self.namespace
        if roll < 0.35:
            return "Get", kv_pb2.GetRequest(namespace=ns, key=key), Get()
        previous = self.rng.random() < 0.3
        if roll < 0.85:
            value = f"{self.number}:{self.seq}".encode()  # unique: a stale read cannot hide
            request = kv_pb2.PutRequest(namespace=ns, key=key, value=value, return_previous=previous)
            if roll >= 0.6:  # compare-and-set against what this client last saw
                request.if_revision = self.known.get(key, 0)
                return "Put", request, Put(value, if_revision=request.if_revision, return_previous=previous)
            return "Put", request, Put(value, return_previous=previous)
        delete = kv_pb2.DeleteRequest(namespace=ns, key=key, return_previous=previous)
        if self.rng.random() < 0.5:
            delete.if_revision = self.known.get(key, 0)
            return "Delete", delete, Delete(if_revision=delete.if_revision, return_previous=previous)
        return "Delete", delete, Delete(return_previous=previous)

    def run(self, count: int, start: threading.Barrier) -> None:
        start.wait()
        try:
            self.calls(count)
        except BaseException as exc:
            self.failure = exc

    def calls(self, count: int) -> None:
        for _ in range(count):
            key = self.rng.choice(KEYS)
            method, request, inp = self.request(key)
            writes = not isinstance(inp, Get)
            short = writes and self.rng.random() < SHORT_SHARE
            timeout = self.rng.uniform(*SHORT_DEADLINE_S) if short else DEADLINE_S
            called = time.monotonic()
            try:
                response = getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
                returned = time.monotonic()
                output = self.answered(key, inp, response)
            except grpc.RpcError as exc:
                returned = time.monotonic()
                self.errors[exc.code().name] += 1
                output = self.refused(key, inp, exc)
                if output is None and exc.code() not in MAYBE_RAN:
                    continue  # refused before it ran (e.g. rate limited): not part of the history
            self.history.append(Operation(key, inp, output, called, returned, self.number))

    def answered(self, key: str, inp: Get | Put | Delete, response: object) -> Output:
        if isinstance(response, kv_pb2.GetResponse):
            self.known[key] = response.kv.mod_revision
            return Found(entry(response.kv))
        if isinstance(response, kv_pb2.PutResponse):
            assert response.kv.mod_revision == response.header.revision
            self.known[key] = response.header.revision
            previous = entry(response.previous) if response.HasField("previous") else None
            return Written(
                response.header.revision, response.kv.create_revision, response.kv.version, previous
            )
        assert isinstance(response, kv_pb2.DeleteResponse) and response.deleted in (0, 1)
        self.known[key] = 0
        # A delete that removed the key answers its own revision; one that did not takes none.
        previous = entry(response.previous[0]) if response.previous else None
        return Deleted(response.deleted, response.header.revision if response.deleted else None, previous)

    def refused(self, key: str, inp: Get | Put | Delete, exc: grpc.RpcError) -> Output | None:
        code = exc.code()
        if isinstance(inp, Get) and code == grpc.StatusCode.NOT_FOUND:
            self.known[key] = 0
            return Found(None)
        if code == grpc.StatusCode.ABORTED:
            info = error_info(exc)
            assert info.reason == "REVISION_MISMATCH", info
            current = int(info.metadata["current_revision"])
            self.known[key] = current
            return Aborted(current)
        if code in MAYBE_RAN:
            return None  # unknown outcome (an unanswered Get is dropped by the checker)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None  # rate limited at the gateway: it never ran
        raise AssertionError(f"unexpected {code.name} for {inp!r}: {exc}")


def record(
    gateway: str, api_key: str, namespace: str, seed: int
) -> tuple[list[Operation], Counter[str], float]:
    """Run the clients; (history, error codes seen, seconds)."""
    channels = [
        # Each client its own connection (no shared subchannel), as separate clients have.
        grpc.insecure_channel(gateway, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CLIENTS)
    ]
    try:
        clients = [
            Client(
                i, kv_pb2_grpc.KvServiceStub(ch), bearer(api_key), namespace, random.Random(seed * 100 + i)
            )
            for i, ch in enumerate(channels)
        ]
        start = threading.Barrier(CLIENTS)
        threads = [
            threading.Thread(target=c.run, args=(OPS // CLIENTS, start), name=f"kv-client-{c.number}")
            for c in clients
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        for channel in channels:
            channel.close()
    errors: Counter[str] = Counter()
    for c in clients:
        if c.failure is not None:
            raise AssertionError(f"client {c.number} failed") from c.failure
        errors.update(c.errors)
    return [op for c in clients for op in c.history], errors, elapsed


def dump(history: list[Operation], path: Path) -> Path:
    """The history, one operation per line in call order, for a failure to be read at leisure."""
    path.write_text(
        "\n".join(op.describe() + f" key={op.key}" for op in sorted(history, key=lambda o: o.call))
    )
    return path


async def test_a_concurrent_kv_history_through_the_gateway_is_linearizable(stack, make_key, tmp_path):
    api_key, _ = await make_key(f"lin-{uuid.uuid4().hex[:10]}", "kv:read", "kv:write")
    namespace = f"lin-{uuid.uuid4().hex[:10]}"
    seed = random.randrange(1 << 30)
    history, errors, elapsed = await asyncio.to_thread(record, stack.gateway, api_key, namespace, seed)
    # Assert the history is worth checking: most calls answered, every kind of answer present.
    assert len(history) >= OPS * 0.95, (len(history), errors)
    kinds = Counter("unknown" if op.output is None else type(op.output).__name__ for op in history)
    assert {"Found", "Written", "Deleted", "Aborted"} <= kinds.keys(), kinds

    result = await asyncio.to_thread(check, history)
    if not result.ok:
        saved = dump(history, tmp_path / "history.txt")
        # The seed repeats the clients' choices, not the interleaving.
        raise AssertionError(f"seed {seed}; whole history in {saved}:\n{result.describe()}")
    states = sum(r.explored for r in result.keys.values())
    landed = sum(1 for r in result.keys.values() for op in r.linearized if op.output is None)
    print(
        f"kv linearizability: {len(history)} ops on {len(KEYS)} keys by {CLIENTS} clients in {elapsed:.1f} s "
        f"({len(history) / elapsed:.0f} ops/s; {dict(kinds)}; {landed} of {kinds['unknown']} unknown "
        f"outcomes placed as landed; errors {dict(errors)}); checked in {result.seconds:.2f} s ({states} states); "
        f"seed {seed}"
    )


# -- Delete's header.revision ----------------------------------------------------


def race_deletes(gateway: str, api_key: str, namespace: str, seconds: float) -> tuple[set[int], list[int]]:
    """Re-create and delete one key while other callers put other keys; (put revisions, delete revisions)."""
    md = bearer(api_key)
    stop = threading.Event()
    puts: set[int] = set()
    lock = threading.Lock()

    def noise(number: int) -> None:
        with grpc.insecure_channel(gateway, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            while not stop.is_set():
                request = kv_pb2.PutRequest(namespace=namespace, key=f"noise-{number}", value=b"x")
                revision = stub.Put(request, metadata=md, timeout=DEADLINE_S).header.revision
                with lock:
                    puts.add(revision)

    deletes: list[int] = []
    threads = [threading.Thread(target=noise, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        with grpc.insecure_channel(gateway) as channel:
            stub = kv_pb2_grpc.KvServiceStub(channel)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                put = kv_pb2.PutRequest(namespace=namespace, key="victim", value=b"v")
                revision = stub.Put(put, metadata=md, timeout=DEADLINE_S).header.revision
                gone = stub.Delete(
                    kv_pb2.DeleteRequest(namespace=namespace, key="victim"), metadata=md, timeout=DEADLINE_S
                )
                assert gone.deleted == 1
                deletes.append(gone.header.revision)
                with lock:
                    puts.add(revision)
                    if puts & set(deletes):
                        break
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return puts, deletes


async def test_a_delete_answers_its_own_revision(stack, make_key):
    api_key, _ = await make_key(f"lin-{uuid.uuid4().hex[:10]}", "kv:read", "kv:write")
    namespace = f"del-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    puts, deletes = await asyncio.to_thread(race_deletes, stack.gateway, api_key, namespace, 10.0)
    # Every write takes a revision of its own: a delete cannot share one with a put.
    shared = sorted(puts & set(deletes))
    assert not shared, (
        f"after {len(deletes)} deletes in {time.monotonic() - started:.1f} s, one answered the revision "
        f"of a put: {shared[:5]}"
    )


# -- a write cancelled after its commit (for the maintainers to decide) ---------


def cancel_writes(gateway: str, api_key: str, namespace: str, seconds: float) -> tuple[list[str], int]:
    """Writes whose caller gives up mid-call; what Get (cache first) then answers against List (Postgres).

    The deadline adapts to land near the commit: shorter after a write that
    finished, longer after one that timed out without landing. Returns the stale
    reads seen (one Put's and one Delete's at most) and the number of attempts.
    """
    md = bearer(api_key)
    stale: list[str] = []
    timeout = 0.01
    attempts = 0
    with grpc.insecure_channel(gateway) as channel:
        stub = kv_pb2_grpc.KvServiceStub(channel)
        until = time.monotonic() + seconds
        # Until both a Put and a Delete left Get stale, or time is up.
        while time.monotonic() < until and len({line.split()[0] for line in stale}) < 2:
            attempts += 1
            key = f"k{attempts % 4}"
            stub.Put(kv_pb2.PutRequest(namespace=namespace, key=key, value=b"before"), metadata=md, timeout=5)
            stub.Get(kv_pb2.GetRequest(namespace=namespace, key=key), metadata=md, timeout=5)  # cached
            if attempts % 2:
                method, request = "Delete", kv_pb2.DeleteRequest(namespace=namespace, key=key)
                landed: list[bytes] = []
            else:
                method, request = "Put", kv_pb2.PutRequest(namespace=namespace, key=key, value=b"after")
                landed = [b"after"]
            answered = True
            try:
                getattr(stub, method)(request, metadata=md, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                answered = False
            time.sleep(0.05)  # the write, if it landed, has long committed
            listed = stub.List(kv_pb2.ListRequest(namespace=namespace, prefix=key), metadata=md, timeout=5)
            in_postgres = [kv.value for kv in listed.kvs if kv.key == key]
            try:
                served = [
                    stub.Get(kv_pb2.GetRequest(namespace=namespace, key=key), metadata=md, timeout=5).kv.value
                ]
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                served = []
            if served != in_postgres:
                stale.append(
                    f"{method} #{attempts} ({timeout * 1000:.1f} ms): Postgres holds {in_postgres}, Get answers {served}"
                )
            if answered:
                timeout = max(0.0005, timeout * 0.8)
            elif in_postgres != landed:
                timeout = min(0.1, timeout * 1.25)
    return stale, attempts


async def test_a_write_whose_caller_gave_up_never_leaves_the_cache_stale(stack, make_key):
    api_key, _ = await make_key(f"lin-{uuid.uuid4().hex[:10]}", "kv:read", "kv:write")
    namespace = f"cancel-{uuid.uuid4().hex[:10]}"
    stale, attempts = await asyncio.to_thread(cancel_writes, stack.gateway, api_key, namespace, 20.0)
    assert not stale, f"after {attempts} writes with short deadlines, Get is stale: {stale}"

"""Faults under steady load through the gateway, and the ledger that proves nothing was lost.

:class:`Load` drives KV Puts/Gets and record Creates through the gateway
from many coroutines and keeps a :class:`Ledger` of what each call was told:
the last acknowledged value of every key, the attempts whose outcome is
unknown (the call failed, so the write may or may not have landed), and the
record ids whose creation was acknowledged. Reads are checked as they come:
a Get must never return a value older than the last acknowledged one (a stale
cache after Redis came back would show here).

:class:`Faults` does to a running launcher what operators fear: Redis killed
and restarted, Postgres stopped and started, a service process killed (the
launcher restarts it), the gateway sent SIGTERM (it drains its calls and the
launcher restarts it). Each fault reports how long until the load's next
acknowledged write.

``python -m tests.chaos`` (``make chaos``) runs the soak: minutes of load on
its own embedded backends with a fault every ``--fault-every`` seconds and
resident memory sampled throughout; ``tests/e2e/test_faults_under_load.py``
runs the same machinery for seconds in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc

from devstack.backends import Backends, open_backends
from devstack.launcher import SERVICES
from shared.config.settings import load_settings
from tests.support.calls import AdminStubs
from tests.support.stack import PROJECT_ROOT, Stack, free_port, start_stack

__all__ = ["Faults", "Ledger", "Load", "RunFigures", "provision_tenant", "verify"]

KEYS_PER_WORKER = 16
# What a caller may see while a backend or a process is down (retry), or for a key never written.
_EXPECTED_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND,
}
CALL_TIMEOUT_S = 3.0
RECORDS = "chaos"


@dataclasses.dataclass
class Ledger:
    """What the load was told, per key and per record."""

    acked: dict[str, bytes] = dataclasses.field(default_factory=dict)  # key -> last acknowledged value
    unknown: dict[str, list[bytes]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )  # key -> attempts since its last ack whose outcome is unknown
    records: set[str] = dataclasses.field(default_factory=set)  # acknowledged record ids
    sent: int = 0
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )  # "Method CODE"
    stale_reads: list[str] = dataclasses.field(default_factory=list)
    stale_read_times: list[float] = dataclasses.field(default_factory=list)  # monotonic, one per stale read
    odd: list[tuple[float, str, str]] = dataclasses.field(
        default_factory=list
    )  # (monotonic time, method, code) of failures a retrying client would not expect
    last_ack: float = 0.0  # monotonic time of the latest acknowledged Put
    last_record_ack: float = 0.0  # ... and CreateRecord

    def allowed(self, key: str) -> set[bytes]:
        """Values ``key`` may hold now: its last acknowledged one, or a later attempt."""
        allowed = set(self.unknown.get(key, ()))
        if key in self.acked:
            allowed.add(self.acked[key])
        return allowed


class Load:
    """``workers`` coroutines calling through ``address`` until stopped."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...], namespace: str, workers: int):
        self.address = address
        self.metadata = metadata
        self.namespace = namespace
        self.workers = workers
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Load:
        self._channel = grpc.aio.insecure_channel(self.address)
        kv = kv_pb2_grpc.KvServiceStub(self._channel)
        records = tenants_pb2_grpc.RecordServiceStub(self._channel)
        self._tasks = [asyncio.create_task(self._worker(n, kv, records)) for n in range(self.workers)]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._channel is not None
        await self._channel.close()

    async def _call(self, name: str, call: Callable[..., Awaitable[object]], request: object) -> object:
        """The response, or the failure's status code (counted; the worker backs off a little)."""
        self.ledger.sent += 1
        try:
            response = await call(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.ledger.codes[exc.code().name] += 1
            self.ledger.failures[f"{name} {exc.code().name}"] += 1
            if exc.code() not in _EXPECTED_FAILURES:
                self.ledger.odd.append((time.monotonic(), name, f"{exc.code().name}: {exc.details()}"))
            await asyncio.sleep(0.05)  # as a client's retry policy would
            return exc.code()
        self.ledger.codes["OK"] += 1
        return response

    async def _worker(
        self, n: int, kv: kv_pb2_grpc.KvServiceStub, records: tenants_pb2_grpc.RecordServiceStub
    ) -> None:
        ledger = self.ledger
        i = 0
        while not self._stop.is_set():
            key = f"w{n}-k{i % KEYS_PER_WORKER}"
            value = f"{n}:{i}".encode()
            ledger.unknown[key].append(value)  # until the answer says otherwise
            put = kv_pb2.PutRequest(namespace=self.namespace, key=key, value=value)
            if isinstance(await self._call("Put", kv.Put, put), kv_pb2.PutResponse):
                ledger.acked[key] = value
                ledger.unknown[key].clear()
                ledger.last_ack = time.monotonic()
            read = f"w{n}-k{(i * 7) % KEYS_PER_WORKER}"
            # Read what this worker alone writes, between its own writes: the
            # answer must be the last acknowledged value or a later attempt.
            allowed = ledger.allowed(read)
            got = await self._call("Get", kv.Get, kv_pb2.GetRequest(namespace=self.namespace, key=read))
            seen: bytes | bool | None = False  # False: no answer to check
            if isinstance(got, kv_pb2.GetResponse):
                seen = got.kv.value if got.HasField("kv") else None
            elif got == grpc.StatusCode.NOT_FOUND:
                seen = None
            if seen is not False and read in ledger.acked and seen not in allowed:
                ledger.stale_reads.append(f"{read}: read {seen!r}, expected one of {sorted(allowed)}")
                ledger.stale_read_times.append(time.monotonic())
            if i % 4 == 0:
                record_id = f"w{n}-r{i}"
                create = tenants_pb2.CreateRecordRequest(
                    record=tenants_pb2.Record(collection=RECORDS, id=record_id), request_id=record_id
                )
                create.record.data.update({"worker": n, "seq": i})
                if isinstance(
                    await self._call("CreateRecord", records.CreateRecord, create),
                    tenants_pb2.CreateRecordResponse,
                ):
                    ledger.records.add(record_id)
                    ledger.last_record_ack = time.monotonic()
            i += 1


@dataclasses.dataclass
class FaultFigure:
    """One fault: what it was, when (monotonic), and seconds from its end until the next acknowledged write."""

    name: str
    started: float
    ended: float
    recovery_s: float


class Faults:
    """Faults on a running ``stack`` over ``backends`` (embedded ones), observed through ``ledger``."""

    def __init__(self, stack: Stack, backends: Backends, ledger: Ledger, outage_s: float = 2.0):
        self.stack = stack
        self.backends = backends
        self.ledger = ledger
        self.outage_s = outage_s
        self.figures: list[FaultFigure] = []

    def service_pid(self, name: str) -> int | None:
        """The pid of the launcher's child running service ``name``, if one is running."""
        return self.stack.launched.pids().get(name)

    async def redis_killed(self) -> None:
        """SIGKILL Redis, keep it down for the outage, start it again."""
        assert self.backends.redis is not None
        started = time.monotonic()
        self.backends.redis.kill()
        await asyncio.sleep(self.outage_s)
        await asyncio.to_thread(self.backends.redis.start)
        await self._recovered("redis killed and restarted", started)

    async def postgres_restarted(self) -> None:
        """Stop Postgres (fast shutdown), keep it down for the outage, start it again."""
        assert self.backends.postgres is not None
        started = time.monotonic()
        await asyncio.to_thread(self.backends.postgres.stop)
        await asyncio.sleep(self.outage_s)
        await asyncio.to_thread(self.backends.postgres.start)
        await self._recovered("postgres stopped and restarted", started)

    async def service_killed(self, name: str) -> None:
        """SIGKILL one service process (kv or tenants); the launcher starts another."""
        pid = self.service_pid(name)
        assert pid is not None, f"no {name} process"
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await self._gone(pid)
        await self._recovered(f"{name} process killed (SIGKILL)", started, records=name == "tenants")

    async def gateway_terminated(self) -> None:
        """SIGTERM the gateway: it drains, exits, and the launcher starts another."""
        pid = self.service_pid("gateway")
        assert pid is not None, "no gateway process"
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        await self._gone(pid)
        await self._recovered("gateway sent SIGTERM", started)

    async def _gone(self, pid: int, timeout_s: float = 60.0) -> None:
        # Acknowledgements count from the moment the old process is gone (the launcher reaps it).
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 - another process: nothing to await
            await asyncio.sleep(0.02)

    async def _recovered(
        self, name: str, started: float, *, records: bool = False, timeout_s: float = 60.0
    ) -> None:
        ended = time.monotonic()

        def last() -> float:
            return self.ledger.last_record_ack if records else self.ledger.last_ack

        while last() <= ended:
            if time.monotonic() - ended > timeout_s:
                raise AssertionError(f"no acknowledged write within {timeout_s:.0f}s after: {name}")
            await asyncio.sleep(0.05)
        self.figures.append(FaultFigure(name, started, ended, last() - ended))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def provision_tenant(stack: Stack, tenant: str) -> tuple[tuple[str, str], ...]:
    """Register ``tenant`` and make it a key with KV and records scopes; its call metadata."""
    admin_md = (("authorization", f"Bearer {stack.api_key}"),)
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await tenants_pb2_grpc.TenantServiceStub(channel).CreateTenant(
                tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=tenant)), metadata=admin_md
            )
        made = await AdminStubs(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant=tenant,
                name="chaos load",
                scopes=["kv:read", "kv:write", "tenants:read", "tenants:write"],
            ),
            metadata=admin_md,
        )
    return (("authorization", f"Bearer {made.api_key}"),)


@dataclasses.dataclass
class Verdict:
    """What the data looks like after the run, against the ledger."""

    keys_checked: int
    keys_lost: list[str]
    records_checked: int
    records_lost: list[str]

    @property
    def lost(self) -> int:
        return len(self.keys_lost) + len(self.records_lost)


async def verify(
    address: str, metadata: tuple[tuple[str, str], ...], namespace: str, ledger: Ledger
) -> Verdict:
    """Read every key and record the ledger knows of (after the load has stopped)."""
    keys_lost: list[str] = []
    records_lost: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        kv = kv_pb2_grpc.KvServiceStub(channel)
        records = tenants_pb2_grpc.RecordServiceStub(channel)
        keys = sorted(set(ledger.acked) | {k for k, v in ledger.unknown.items() if v})
        for start in range(0, len(keys), 100):
            chunk = keys[start : start + 100]
            got = await kv.BatchGet(
                kv_pb2.BatchGetRequest(namespace=namespace, keys=chunk),
                metadata=metadata,
                timeout=30,
                wait_for_ready=True,
            )
            values = {item.key: item.value for item in got.kvs}
            for key in chunk:
                allowed = ledger.allowed(key)
                value = values.get(key)
                if key in ledger.acked and value not in allowed:
                    keys_lost.append(f"{key}: holds {value!r}, acknowledged {ledger.acked[key]!r}")
        ids = sorted(ledger.records)
        for start in range(0, len(ids), 100):
            chunk = ids[start : start + 100]
            got_records = await records.BatchGetRecords(
                tenants_pb2.BatchGetRecordsRequest(collection=RECORDS, ids=chunk),
                metadata=metadata,
                timeout=30,
            )
            present = {r.id for r in got_records.records}
            records_lost.extend(i for i in chunk if i not in present)
    return Verdict(len(keys), keys_lost, len(ids), records_lost)


@dataclasses.dataclass
class RunFigures:
    """Everything a run reports."""

    seconds: float
    workers: int
    ledger: Ledger
    faults: list[FaultFigure]
    verdict: Verdict
    memory_mib: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # process -> samples

    def fault_at(self, when: float) -> str:
        """The fault under way at monotonic time ``when`` (from its start to its end), or "no fault"."""
        for fault in self.faults:
            if fault.started <= when <= fault.ended:
                return fault.name
        return "no fault"

    def since_fault(self, when: float) -> str:
        """How long after the start of the latest fault before ``when`` it was, e.g. "0.42 s into redis ..."."""
        begun = [f for f in self.faults if f.started <= when]
        if not begun:
            return "before any fault"
        fault = max(begun, key=lambda f: f.started)
        return f"{when - fault.started:.2f} s after {fault.name} began"

    def summary(self) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in self.ledger.codes.most_common())
        lines = [
            f"load: {self.ledger.sent} requests in {self.seconds:.0f} s through the gateway "
            f"({self.workers} workers; Put + Get per step, CreateRecord every 4th)",
            f"answers: {codes}",
            "failures: " + (", ".join(f"{k} {v}" for k, v in self.ledger.failures.most_common()) or "none"),
            "faults: "
            + ("; ".join(f"{f.name} (next ack after {f.recovery_s:.2f} s)" for f in self.faults) or "none"),
            f"checked: {self.verdict.keys_checked} keys, {self.verdict.records_checked} records; "
            f"stale reads {len(self.ledger.stale_reads)}; data lost {self.verdict.lost}",
        ]
        if self.ledger.stale_reads:
            lines.append("stale reads, each with the fault it fell in:")
            lines.extend(
                f"  {read} ({self.since_fault(when)})"
                for read, when in zip(self.ledger.stale_reads, self.ledger.stale_read_times, strict=True)
            )
        if self.ledger.odd:
            lines.append("other failures, each with the fault it fell in:")
            lines.extend(
                f"  {method} {status} ({self.fault_at(when)})" for when, method, status in self.ledger.odd
            )
        for name, samples in sorted(self.memory_mib.items()):
            if samples:
                lines.append(
                    f"memory {name}: first {samples[0]:.1f} MiB, last {samples[-1]:.1f} MiB, "
                    f"max {max(samples):.1f} MiB ({len(samples)} samples)"
                )
        return "\n".join(lines)


def resident_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB, or None if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


async def soak(minutes: float, fault_every_s: float, workers: int) -> RunFigures:
    """``make chaos``: load for ``minutes`` on fresh embedded backends, a fault every ``fault_every_s``.

    Backend faults (Redis, Postgres) rotate through the soak so the service
    processes live through all of it and their memory can be compared from
    start to end; the process faults (a service killed, the gateway
    terminated) come once, at the end.
    """
    data_dir = PROJECT_ROOT / ".strata" / "chaos"
    shutil.rmtree(data_dir, ignore_errors=True)
    base = load_settings(
        {
            "STRATA_DATA_DIR": str(data_dir),
            "STRATA_EMBEDDED_PG_PORT": str(free_port()),
            "STRATA_EMBEDDED_REDIS_PORT": str(free_port()),
        }
    )
    backends = await open_backends(base, tuple(SERVICES))
    settings = dataclasses.replace(
        base,
        database_url=backends.database_url,
        redis_url=backends.redis_url,
        migrate_database_url=backends.migrate_database_url,
    )
    # The soak's load is not what is limited: a generous rate for its key (as in the test).
    stack = await start_stack(settings, STRATA_RATE_LIMIT_RPS="100000", STRATA_RATE_LIMIT_BURST="100000")
    try:
        metadata = await provision_tenant(stack, "chaos")
        started = time.monotonic()
        memory: dict[str, list[float]] = collections.defaultdict(list)
        async with Load(stack.gateway, metadata, "soak", workers) as load:
            faults = Faults(stack, backends, load.ledger)
            rotation = [faults.redis_killed, faults.postgres_restarted]
            next_fault = started + fault_every_s
            turn = 0
            while (now := time.monotonic()) < started + minutes * 60:
                for name in SERVICES:
                    pid = faults.service_pid(name)
                    rss = resident_mib(pid) if pid else None
                    if rss is not None:
                        memory[name].append(rss)
                if now >= next_fault:
                    await rotation[turn % len(rotation)]()
                    turn += 1
                    next_fault = time.monotonic() + fault_every_s
                print(
                    f"{now - started:6.0f} s  {load.ledger.sent} requests  {dict(load.ledger.codes)}",
                    flush=True,
                )
                await asyncio.sleep(10)
            await faults.service_killed("kv")
            await faults.gateway_terminated()
            await asyncio.sleep(2)
        seconds = time.monotonic() - started
        verdict = await verify(stack.gateway, metadata, "soak", load.ledger)
        return RunFigures(seconds, workers, load.ledger, faults.figures, verdict, dict(memory))
    finally:
        await stack.stop()
        backends.close()
        # What the processes said, for the failures the summary lists.
        (PROJECT_ROOT / ".strata" / "chaos-output.log").write_text("\n".join(stack.output) + "\n")
        shutil.rmtree(data_dir, ignore_errors=True)


def memory_is_flat(samples: list[float], tolerance_mib: float = 16.0) -> bool:
    """Whether the last quarter of ``samples`` stays within ``tolerance_mib`` of the second quarter."""
    if len(samples) < 8:
        return True
    quarter = len(samples) // 4
    return (
        statistics.median(samples[-quarter:]) - statistics.median(samples[quarter : 2 * quarter])
        < tolerance_mib
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="Soak Strata under load and faults (make chaos).")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between backend faults")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    figures = asyncio.run(soak(args.minutes, args.fault_every, args.workers))
    print(figures.summary())
    growing = [name for name, samples in figures.memory_mib.items() if not memory_is_flat(samples)]
    # Only grpc's CANCELLED for calls caught by the gateway's exit is excused (see test_faults_under_load).
    odd = [entry for entry in figures.ledger.odd if figures.fault_at(entry[0]) != "gateway sent SIGTERM"]
    failed = figures.verdict.lost or figures.ledger.stale_reads or growing or odd
    for problem in figures.verdict.keys_lost + figures.verdict.records_lost + figures.ledger.stale_reads:
        print(f"  {problem}")
    if growing:
        print(f"memory grew in: {', '.join(growing)}")
    print(f"launcher output in {PROJECT_ROOT / '.strata' / 'chaos-output.log'}")
    print("chaos: FAILED" if failed else "chaos: passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

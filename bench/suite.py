"""The benchmark scenarios, run side by side in rounds against one Strata.

Every figure that matters is a ratio of two measurements taken in the same
round (service vs the bare echo server, service vs raw asyncpg), and the
reported ratio is the median over rounds, so the machine's noise hits both
sides of each ratio alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from strata.common.v1 import filter_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2

from bench.etcd import PUT, RANGE, etcd_available, etcd_server, put_request, range_request
from bench.h2load import Measurement, run_h2load
from bench.pyload import Job, run_python_load, worker_offset
from bench.stack import ROOT
from bench.target import Target
from bench.vectors import (
    EF_SEARCH,
    RAW_FILTERED_SEARCH,
    RAW_SEARCH,
    VECTOR,
    VectorData,
    load_raw,
    load_service,
    raw_queries,
    recall_at_10,
    search_bodies,
)
from devstack.ports import free_port
from shared.cache.invalidations import invalidate_prefix
from shared.cache.redisclient import open_redis
from shared.observability.stats import read_process_stats

__all__ = ["Config", "Suite"]

KV = "/strata.kv.v1.KvService/"
RECORDS = "/strata.tenants.v1.RecordService/"
ECHO = "/bench.Echo/Echo"
NAMESPACE = "bench"
TENANT = "bench"  # direct calls are signed for this tenant (Target.signed)
BATCH = 100


@dataclass(frozen=True)
class Config:
    """How long and how hard: the defaults are ``make bench``'s; tests use a tiny one."""

    rounds: int = 3
    duration_s: float = 5.0
    warmup_s: float = 1.0
    connections: int = 4  # h2load connections
    streams: int = 16  # h2load concurrent streams per connection (64 calls in flight)
    moderate_streams: int = 4  # one connection, this many in flight: latency at moderate load
    python_processes: int = 2
    python_concurrency: int = 64
    keys: int = 10_000
    records: int = 2_000
    vectors: int = 100_000  # points of the 128-dimension vector scenarios
    tracing: bool = True  # run the tracing on/off phase
    scaling: bool = True  # run the scaling phase (kv and gateway process counts)
    only: frozenset[str] = frozenset()  # scenario names to run (empty: all); for profiling one


@dataclass
class Suite:
    """Runs the scenarios against ``target`` and collects every round's measurements."""

    target: Target
    config: Config
    owner_url: str
    rounds: list[dict[str, Measurement]] = field(default_factory=list)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    cache: list[dict[str, float]] = field(default_factory=list)  # per round: the Zipf mix's figures
    tracing: list[dict[str, float]] = field(default_factory=list)  # per round: gateway Get rps, "off" / "on"
    scaling: dict[str, Any] | None = None  # see bench.scaling
    puts_per_commit: list[float] = field(
        default_factory=list
    )  # per round: group commit's batch size under Put

    async def run(self, log: Callable[[str], None] = print) -> None:
        """Prepare the data, then run every scenario once per round."""
        await self._prepare()
        scenarios = self._scenarios()
        self.memory["idle"] = resident_memory(self.target.pids)
        # Every role in one process, idle but for what the preparation sent it (nothing).
        self.memory["one_process_idle"] = resident_memory({"all": self.target.one_process_pid})
        peer = etcd_server() if etcd_available() else contextlib.nullcontext(None)
        async with echo_server() as echo_port, peer as etcd_port:
            if etcd_port is not None:
                scenarios.update(await self._etcd_scenarios(etcd_port))
            if self.config.only:
                scenarios = {name: run for name, run in scenarios.items() if name in self.config.only}
            for round_number in range(1, self.config.rounds + 1):
                measured: dict[str, Measurement] = {}
                for name, scenario in scenarios.items():
                    measured[name] = await scenario(echo_port)
                    log(f"round {round_number} {name:<26} {_line(measured[name])}")
                self.rounds.append(measured)

    # -- preparation -------------------------------------------------------

    async def scenario(self, name: str) -> Measurement:
        """Run one scenario by name (outside the rounds)."""
        return await self._scenarios()[name](0)

    async def _prepare(self) -> None:
        await self.prepare_kv()
        await self._prepare_records()
        await self._prepare_sql()
        await self._prepare_vectors()

    async def _prepare_vectors(self) -> None:
        """Load the same points through the service and by raw COPY (timed), and measure recall once."""
        data = VectorData.clustered(self.config.vectors, queries=min(200, max(10, self.config.vectors // 10)))
        self._vector_data = data
        service_pps = await load_service(self.target, data)
        copy_pps = await load_raw(self.owner_url, self.target.database_url, data)
        self.vector = {
            "points": len(data.points),
            "service_upsert_points_per_s": service_pps,
            "copy_points_per_s": copy_pps,
            "upsert_vs_copy": service_pps / copy_pps,
            "recall_at_10": await recall_at_10(self.target, data),
        }

    async def _prepare_records(self) -> None:
        """Records r0..r<records-1> in collection "orders"; one in ten is "open"."""
        async with self.target.channel("tenants", TENANT) as channel:
            create = channel.unary_unary(RECORDS + "CreateRecord")

            async def one(i: int) -> None:
                record = tenants_pb2.Record(collection="orders", id=f"r{i}")
                record.data.update({"status": "open" if i % 10 == 0 else "closed", "total": i})
                request = tenants_pb2.CreateRecordRequest(record=record)
                with contextlib.suppress(grpc.aio.AioRpcError):  # ALREADY_EXISTS on a second prepare
                    await create(request.SerializeToString())

            for start in range(0, self.config.records, 50):
                await asyncio.gather(*(one(i) for i in range(start, min(start + 50, self.config.records))))

    async def prepare_kv(self) -> None:
        """The keys the KV scenarios read."""
        async with self.target.channel("kv", TENANT) as channel:
            put = channel.unary_unary(KV + "Put")
            for key in ("hot", *(f"b{i}" for i in range(BATCH))):
                await put(_put(key))
            batch_put = channel.unary_unary(KV + "BatchPut")
            for start in range(0, self.config.keys, 1000):
                items = [
                    kv_pb2.BatchPutItem(key=f"z{i}", value=b"v" * 64)
                    for i in range(start, min(start + 1000, self.config.keys))
                ]
                request = kv_pb2.BatchPutRequest(namespace=NAMESPACE, items=items)
                await batch_put(request.SerializeToString())
        async with grpc.aio.insecure_channel(self.target.address("gateway")) as channel:
            await channel.unary_unary(KV + "Put")(_put("hot"), metadata=self.target.bearer())

    async def _prepare_sql(self) -> None:
        conn = await asyncpg.connect(self.owner_url)
        try:
            # The raw baseline's table: same durability (a logged table, synchronous commit).
            await conn.execute(
                "CREATE SCHEMA IF NOT EXISTS bench;"
                "CREATE TABLE IF NOT EXISTS bench.kv (k text PRIMARY KEY, v bytea NOT NULL);"
                "GRANT USAGE ON SCHEMA bench TO strata_app;"
                "GRANT SELECT, INSERT, UPDATE ON bench.kv TO strata_app;"
            )
            await conn.execute(
                "INSERT INTO bench.kv SELECT 'k' || i, '\\x7631'::bytea FROM generate_series(0, $1 - 1) i "
                "ON CONFLICT DO NOTHING",
                self.config.keys,
            )
        finally:
            await conn.close()

    def _grpc_job(self, process: str, path: str, bodies: list[bytes]) -> Job:
        return Job(
            "grpc",
            {
                "address": self.target.address(process),
                "path": path,
                "bodies": bodies,
                "signed_as": self.target.signing(TENANT),
            },
        )

    def _tenant_sql_job(self, sql: str, args: list[str], ids: int = 0) -> Job:
        params = {"dsn": self.target.database_url, "tenant": TENANT, "sql": sql, "args": args, "ids": ids}
        return Job("asyncpg_tenant", params)

    async def _kv_cache_counters(self) -> dict[str, float]:
        """The kv processes' cache counters, summed, as last published."""
        return await self._kv_figures("cache", ("local_hits", "redis_hits", "misses", "loads"))

    async def _kv_figures(self, source: str, names: tuple[str, ...]) -> dict[str, float]:
        """The kv processes' published figures ``source`` (``names`` of it), summed."""
        redis = open_redis(self.target.redis_url)
        try:
            snapshots = [s for s in await read_process_stats(redis) if s.component == "kv"]
        finally:
            await redis.aclose()
        totals: dict[str, float] = {k: 0.0 for k in names}
        for snapshot in snapshots:
            for name in totals:
                totals[name] += float(snapshot.figures.get(source, {}).get(name, 0))
        return totals

    def _direct(self, method: str, body: bytes) -> list[tuple[str, str]]:
        """A KV call's signed identity for ``body`` (h2load sends that one body throughout)."""
        return self.target.signed(KV + method, body, TENANT)

    # -- scenarios ---------------------------------------------------------

    def _scenarios(self) -> dict[str, Callable[[int], Awaitable[Measurement]]]:
        get = kv_pb2.GetRequest(namespace=NAMESPACE, key="hot").SerializeToString()
        batch = kv_pb2.BatchGetRequest(
            namespace=NAMESPACE, keys=[f"b{i}" for i in range(BATCH)]
        ).SerializeToString()
        config = self.config

        async def echo(port: int) -> Measurement:
            return await self._h2load(f"127.0.0.1:{port}", ECHO, get, len(get), [])

        async def kv_get_direct(_: int) -> Measurement:
            return await self._unary("kv", "Get", get, self._direct("Get", get))

        async def kv_get_gateway(_: int) -> Measurement:
            return await self._unary("gateway", "Get", get, self.target.bearer(), sample_memory=True)

        async def kv_get_one_process(_: int) -> Measurement:
            return await self._unary("all", "Get", get, self.target.bearer())

        async def kv_get_one_process_moderate(_: int) -> Measurement:
            return await self._unary("all", "Get", get, self.target.bearer(), moderate=True)

        async def kv_get_direct_moderate(_: int) -> Measurement:
            return await self._unary("kv", "Get", get, self._direct("Get", get), moderate=True)

        async def kv_get_gateway_moderate(_: int) -> Measurement:
            return await self._unary("gateway", "Get", get, self.target.bearer(), moderate=True)

        async def batchget_direct(_: int) -> Measurement:
            return await self._unary("kv", "BatchGet", batch, self._direct("BatchGet", batch))

        async def kv_put_direct(_: int) -> Measurement:
            before = await self._kv_figures("group_commit", ("batches", "entries"))
            measured = await put_distinct_keys()
            await asyncio.sleep(0.6)  # the kv process publishes its figures every 0.25 s
            after = await self._kv_figures("group_commit", ("batches", "entries"))
            batches = after["batches"] - before["batches"]
            self.puts_per_commit.append((after["entries"] - before["entries"]) / batches if batches else 0.0)
            return measured

        async def put_distinct_keys() -> Measurement:
            bodies = [_put(f"w{i}") for i in range(config.keys)]
            job = Job(
                "grpc",
                {
                    "address": self.target.address("kv"),
                    "path": KV + "Put",
                    "bodies": bodies,
                    "signed_as": self.target.signing(TENANT),
                },
            )
            return await self._python(job)

        async def kv_get_zipf(_: int) -> Measurement:
            # Start cold: the keys were cached when written; the mix itself decides what gets cached.
            redis = open_redis(self.target.redis_url)
            try:
                await invalidate_prefix(redis, "kv", f"{TENANT}\x00{NAMESPACE}\x00z".encode())
            finally:
                await redis.aclose()
            await asyncio.sleep(0.2)  # the broadcast reaches the kv process's local tier

            def zipf_job(seed: int) -> Job:
                return Job(
                    "grpc",
                    {
                        "address": self.target.address("kv"),
                        "path": KV + "Get",
                        "bodies": zipf_gets(config.keys, seed=seed),
                        "signed_as": self.target.signing(TENANT),
                    },
                )

            # Steady state: a warm-up of the same mix (3x the run), then a fresh draw is measured.
            warmup = await self._python(zipf_job(seed=1), warmup_s=0.0, duration_s=3 * config.duration_s)
            await asyncio.sleep(0.6)  # the kv process publishes its counters every 0.25 s
            before = await self._kv_cache_counters()
            measured = await self._python(zipf_job(seed=2), warmup_s=0.0)
            await asyncio.sleep(0.6)
            after = await self._kv_cache_counters()
            lookups = sum(after[k] - before[k] for k in ("local_hits", "redis_hits", "misses"))
            hits = sum(after[k] - before[k] for k in ("local_hits", "redis_hits"))
            # A key's first request ever must miss, whatever the cache: those misses are the
            # mix's, not the cache's. Counted exactly from the bodies each worker sent.
            seen = requested_keys(zipf_gets(config.keys, seed=1), warmup.sent_per_worker)
            first = first_touches(zipf_gets(config.keys, seed=2), measured.sent_per_worker, seen)
            self.cache.append(
                {
                    "hit_ratio": hits / lookups if lookups else 0.0,
                    "postgres_reads_per_1000_gets": 1000 * (after["loads"] - before["loads"]) / lookups
                    if lookups
                    else 0.0,
                    "lookups": lookups,
                    "first_touch_share": first / lookups if lookups else 0.0,
                    "hit_ratio_of_repeat_keys": hits / (lookups - first) if lookups > first else 0.0,
                }
            )
            return measured

        async def kv_get_direct_python(_: int) -> Measurement:
            # The same Get through the same Python client as the Put: shows when that client is the limit.
            job = Job(
                "grpc",
                {
                    "address": self.target.address("kv"),
                    "path": KV + "Get",
                    "bodies": [get],
                    "signed_as": self.target.signing(TENANT),
                },
            )
            return await self._python(job)

        record_columns = "collection, id, data, revision, created_at, updated_at"
        list_request = tenants_pb2.ListRecordsRequest(
            collection="orders", filter=_status_is("open"), page_size=20
        )

        async def records_get_direct(_: int) -> Measurement:
            bodies = [
                tenants_pb2.GetRecordRequest(collection="orders", id=f"r{i}").SerializeToString()
                for i in range(config.records)
            ]
            return await self._python(self._grpc_job("tenants", RECORDS + "GetRecord", bodies))

        async def records_list_direct(_: int) -> Measurement:
            body = list_request.SerializeToString()
            return await self._python(self._grpc_job("tenants", RECORDS + "ListRecords", [body]))

        async def asyncpg_record_get(_: int) -> Measurement:
            sql = f"SELECT {record_columns} FROM tenants.records WHERE collection = $1 AND id = $2"
            return await self._python(self._tenant_sql_job(sql, ["orders"], ids=config.records))

        async def asyncpg_record_list(_: int) -> Measurement:
            sql = (
                f"SELECT {record_columns} FROM tenants.records "
                "WHERE collection = $1 AND data -> 'status' = to_jsonb($2::text) ORDER BY id LIMIT 21"
            )
            return await self._python(self._tenant_sql_job(sql, ["orders", "open"]))

        async def vector_search_direct(_: int) -> Measurement:
            assert self._vector_data is not None
            return await self._python(
                self._grpc_job("vector", VECTOR + "Search", search_bodies(self._vector_data))
            )

        async def sql_vector_search(_: int) -> Measurement:
            assert self._vector_data is not None
            params = {
                "dsn": self.target.database_url,
                "sql": RAW_SEARCH,
                "arguments": raw_queries(self._vector_data),
                "setup": [f"SET LOCAL hnsw.ef_search = {EF_SEARCH}"],
            }
            return await self._python(Job("asyncpg_query", params))

        async def vector_search_filtered_direct(_: int) -> Measurement:
            assert self._vector_data is not None
            bodies = search_bodies(self._vector_data, filtered=True)
            return await self._python(self._grpc_job("vector", VECTOR + "Search", bodies))

        async def sql_vector_search_filtered(_: int) -> Measurement:
            assert self._vector_data is not None
            params = {
                "dsn": self.target.database_url,
                "sql": RAW_FILTERED_SEARCH,
                "arguments": raw_queries(self._vector_data, filtered=True),
                "setup": [
                    f"SET LOCAL hnsw.ef_search = {EF_SEARCH}",
                    "SET LOCAL hnsw.iterative_scan = relaxed_order",
                ],
            }
            return await self._python(Job("asyncpg_query", params))

        async def asyncpg_upsert(_: int) -> Measurement:
            sql = "INSERT INTO bench.kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
            return await self._python(
                Job(
                    "asyncpg",
                    {"dsn": self.target.database_url, "sql": sql, "keys": config.keys, "value": b"v1"},
                )
            )

        async def asyncpg_select(_: int) -> Measurement:
            sql = "SELECT v FROM bench.kv WHERE k = $1"
            return await self._python(
                Job("asyncpg", {"dsn": self.target.database_url, "sql": sql, "keys": config.keys})
            )

        async def redis_get(_: int) -> Measurement:
            return await self._python(Job("redis_get", {"url": self.target.redis_url, "keys": config.keys}))

        return {
            "echo": echo,
            "kv_get_direct": kv_get_direct,
            "kv_get_gateway": kv_get_gateway,
            "kv_get_one_process": kv_get_one_process,
            "kv_get_one_process_moderate": kv_get_one_process_moderate,
            "kv_get_direct_moderate": kv_get_direct_moderate,
            "kv_get_gateway_moderate": kv_get_gateway_moderate,
            "batchget100_direct": batchget_direct,
            "kv_put_direct": kv_put_direct,
            "kv_get_direct_python": kv_get_direct_python,
            "kv_get_zipf": kv_get_zipf,
            "records_get_direct": records_get_direct,
            "asyncpg_record_get": asyncpg_record_get,
            "records_list_direct": records_list_direct,
            "asyncpg_record_list": asyncpg_record_list,
            "vector_search_direct": vector_search_direct,
            "sql_vector_search": sql_vector_search,
            "vector_search_filtered_direct": vector_search_filtered_direct,
            "sql_vector_search_filtered": sql_vector_search_filtered,
            "asyncpg_upsert": asyncpg_upsert,
            "asyncpg_select": asyncpg_select,
            "redis_get": redis_get,
        }

    async def _etcd_scenarios(self, port: int) -> dict[str, Callable[[int], Awaitable[Measurement]]]:
        """The peer, beside Strata's own single-key Get and Put (one hot key each, as h2load repeats)."""
        address = f"127.0.0.1:{port}"
        value = b"v" * 64
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.unary_unary(PUT)(put_request(b"hot", value), timeout=10)

        async def etcd_range(_: int) -> Measurement:
            return await self._probed(address, RANGE, range_request(b"hot"), [])

        async def etcd_put(_: int) -> Measurement:
            return await self._probed(address, PUT, put_request(b"w", value), [])

        async def kv_put_hot_direct(_: int) -> Measurement:
            put = _put("w")
            return await self._probed(self.target.address("kv"), KV + "Put", put, self._direct("Put", put))

        return {"etcd_range": etcd_range, "etcd_put": etcd_put, "kv_put_hot_direct": kv_put_hot_direct}

    async def _probed(
        self, address: str, path: str, body: bytes, metadata: list[tuple[str, str]], **shape: int
    ) -> Measurement:
        """h2load on ``path`` after one call that tells a successful response's size."""
        async with grpc.aio.insecure_channel(address) as channel:
            response = await channel.unary_unary(path)(body, metadata=metadata, timeout=10)
        return await self._h2load(address, path, body, len(response), metadata, **shape)

    async def _unary(
        self,
        process: str,
        method: str,
        body: bytes,
        metadata: list[tuple[str, str]],
        *,
        sample_memory: bool = False,
        moderate: bool = False,
    ) -> Measurement:
        shape = {"connections": 1, "streams": self.config.moderate_streams} if moderate else {}
        run = self._probed(self.target.address(process), KV + method, body, metadata, **shape)
        if not sample_memory:
            return await run
        task = asyncio.create_task(run)
        await asyncio.sleep(self.config.warmup_s + self.config.duration_s / 2)
        self.memory["under_load"] = resident_memory(self.target.pids)
        return await task

    async def _h2load(
        self,
        address: str,
        path: str,
        body: bytes,
        response_bytes: int,
        headers: list[tuple[str, str]],
        *,
        connections: int | None = None,
        streams: int | None = None,
    ) -> Measurement:
        return await run_h2load(
            address,
            path,
            body,
            response_bytes,
            headers=headers,
            connections=connections or self.config.connections,
            streams=streams or self.config.streams,
            duration_s=self.config.duration_s,
            warmup_s=self.config.warmup_s,
        )

    async def _python(
        self, job: Job, *, warmup_s: float | None = None, duration_s: float | None = None
    ) -> Measurement:
        return await run_python_load(
            job,
            processes=self.config.python_processes,
            concurrency=self.config.python_concurrency,
            duration_s=self.config.duration_s if duration_s is None else duration_s,
            warmup_s=self.config.warmup_s if warmup_s is None else warmup_s,
        )

    # -- results -----------------------------------------------------------

    def medians(self) -> dict[str, dict[str, Any]]:
        """Per scenario, the median over rounds of rps, p50 and p99."""
        names = self.rounds[0].keys() if self.rounds else []
        return {
            name: {
                "rps": statistics.median(r[name].rps for r in self.rounds),
                "p50_ms": statistics.median(r[name].p50_ms for r in self.rounds),
                "p99_ms": statistics.median(r[name].p99_ms for r in self.rounds),
                "tool": self.rounds[0][name].tool,
            }
            for name in names
        }

    def cache_figures(self) -> dict[str, float] | None:
        """The Zipf mix: median hit ratio and Postgres reads per 1,000 Gets over rounds."""
        if not self.cache:
            return None
        return {
            name: statistics.median(r[name] for r in self.cache)
            for name in (
                "hit_ratio",
                "postgres_reads_per_1000_gets",
                "first_touch_share",
                "hit_ratio_of_repeat_keys",
            )
        }

    def ratios(self) -> dict[str, float | None]:
        """The headline ratios: per round, then the median over rounds."""

        def median_of(numerator: str, denominator: str, scale: float = 1.0) -> float | None:
            if not (self._has(numerator) and self._has(denominator)):
                return None  # not run (an --only run, or etcd missing)
            return statistics.median(scale * r[numerator].rps / r[denominator].rps for r in self.rounds)

        return {
            "kv_get_direct_vs_echo": median_of("kv_get_direct", "echo"),
            "kv_get_gateway_vs_echo": median_of("kv_get_gateway", "echo"),
            # Every role in one process: the gateway hands the Get to kv's handler in-process.
            "kv_get_one_process_vs_echo": median_of("kv_get_one_process", "echo"),
            "kv_get_one_process_vs_direct": median_of("kv_get_one_process", "kv_get_direct"),
            "batchget_keys_vs_get": median_of("batchget100_direct", "kv_get_direct", BATCH),
            "put_vs_asyncpg": median_of("kv_put_direct", "asyncpg_upsert"),
            "records_get_vs_sql": median_of("records_get_direct", "asyncpg_record_get"),
            "records_list_vs_sql": median_of("records_list_direct", "asyncpg_record_list"),
            "vector_qps_vs_sql": median_of("vector_search_direct", "sql_vector_search"),
            "vector_filtered_qps_vs_sql": median_of(
                "vector_search_filtered_direct", "sql_vector_search_filtered"
            ),
            "tracing_on_vs_off": statistics.median(r["on"] / r["off"] for r in self.tracing)
            if self.tracing
            else None,
            "kv_get_vs_etcd_range": median_of("kv_get_direct", "etcd_range"),
            "kv_put_vs_etcd_put": median_of("kv_put_hot_direct", "etcd_put"),
        }

    def _has(self, scenario: str) -> bool:
        return bool(self.rounds) and scenario in self.rounds[0]

    def one_process_added_p50_ms(self) -> float | None:
        """Median over rounds of the all-roles gateway's p50 minus the service's, at moderate load."""
        if not (self._has("kv_get_one_process_moderate") and self._has("kv_get_direct_moderate")):
            return None
        return statistics.median(
            r["kv_get_one_process_moderate"].p50_ms - r["kv_get_direct_moderate"].p50_ms for r in self.rounds
        )

    def gateway_added_p50_ms(self) -> float | None:
        """Median over rounds of the gateway's p50 minus the service's, at moderate load."""
        if not (self._has("kv_get_gateway_moderate") and self._has("kv_get_direct_moderate")):
            return None
        return statistics.median(
            r["kv_get_gateway_moderate"].p50_ms - r["kv_get_direct_moderate"].p50_ms for r in self.rounds
        )


def zipf_gets(keys: int, samples: int = 50_000, exponent: float = 1.1, seed: int = 7) -> list[bytes]:
    """Get requests for keys z0..z<keys-1> drawn from a Zipf distribution (a fixed seed)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(keys)]
    drawn = rng.choices(range(keys), weights=weights, k=samples)
    return [kv_pb2.GetRequest(namespace=NAMESPACE, key=f"z{i}").SerializeToString() for i in drawn]


def requested_keys(bodies: list[bytes], sent_per_worker: tuple[int, ...]) -> set[bytes]:
    """The bodies the Python load's workers actually sent from ``bodies`` (see pyload.worker_offset)."""
    return {
        bodies[(worker_offset(worker) + i) % len(bodies)]
        for worker, sent in enumerate(sent_per_worker)
        for i in range(1, sent + 1)
    }


def first_touches(bodies: list[bytes], sent_per_worker: tuple[int, ...], seen: set[bytes]) -> int:
    """How many of the calls sent from ``bodies`` asked for a body never sent before (``seen`` grows)."""
    count = 0
    for worker, sent in enumerate(sent_per_worker):
        for i in range(1, sent + 1):
            body = bodies[(worker_offset(worker) + i) % len(bodies)]
            if body not in seen:
                seen.add(body)
                count += 1
    return count


def _status_is(status: str) -> filter_pb2.Filter:
    condition = filter_pb2.Condition(path="status", op=filter_pb2.OPERATOR_EQ)
    condition.value.string_value = status
    return filter_pb2.Filter(condition=condition)


def _put(key: str) -> bytes:
    return kv_pb2.PutRequest(namespace=NAMESPACE, key=key, value=b"v" * 64).SerializeToString()


def _line(m: Measurement) -> str:
    return f"{m.rps:>10.0f} rps  p50 {m.p50_ms:7.3f} ms  p99 {m.p99_ms:7.3f} ms  ({m.tool})"


def resident_memory(pids: dict[str, int]) -> dict[str, int]:
    """Resident set size in bytes of each process (VmRSS)."""
    found: dict[str, int] = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[name] = int(line.split()[1]) * 1024
    return found


@contextlib.asynccontextmanager
async def echo_server() -> Any:
    """The bare echo server as its own process; yields its port."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo_server", str(port), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line.startswith(b"READY"):
            raise RuntimeError("the echo server did not start")
        yield port
    finally:
        process.kill()
        await process.wait()

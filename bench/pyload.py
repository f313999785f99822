"""A load generator of several Python processes, for work h2load cannot send.

h2load repeats one request body; writes to distinct keys, and the raw
asyncpg / redis baselines, need a client that varies its requests. Each
worker process runs ``concurrency`` coroutines in a loop for the warm-up
plus the measured period and reports how many calls finished in the
measured period and a sample of their latencies. Several processes keep
the client from being the bottleneck on one core; the figures say so
("python xN").
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from typing import Any

from bench.h2load import Measurement, percentile

__all__ = ["Job", "run_python_load"]

_SAMPLE = 20_000  # latencies kept per worker


@dataclass(frozen=True)
class Job:
    """What each worker does: ``kind`` names the operation, ``params`` configure it (picklable)."""

    kind: str  # "grpc", "asyncpg", "redis_get"
    params: dict[str, Any] = field(default_factory=dict)


async def _operation(job: Job, worker: int) -> tuple[Any, Any]:
    """(an async callable doing one call given a counter, a closer) for ``job``."""
    params = job.params
    if job.kind == "grpc":
        import grpc

        from bench.target import bench_caller
        from shared.rpc.identity import signing_interceptors

        # Direct calls are signed each for its own body, as the gateway signs them; through the
        # gateway, ``metadata`` carries the API key.
        signed_as = params.get("signed_as")
        interceptors = (
            signing_interceptors(signed_as["secret"].encode(), bench_caller(signed_as["tenant"]))
            if signed_as
            else None
        )
        channel = grpc.aio.insecure_channel(params["address"], interceptors=interceptors)
        call = channel.unary_unary(params["path"])
        bodies: list[bytes] = params["bodies"]
        metadata = tuple(params.get("metadata", ()))
        offset = worker_offset(worker)

        async def one(i: int) -> None:
            await call(bodies[(offset + i) % len(bodies)], metadata=metadata, timeout=10)

        return one, channel.close
    if job.kind == "asyncpg":
        import asyncpg

        pool = await asyncpg.create_pool(
            params["dsn"], min_size=params["concurrency"], max_size=params["concurrency"]
        )
        sql: str = params["sql"]
        keys: int = params["keys"]

        async def one(i: int) -> None:
            key = f"k{(worker_offset(worker) + i) % keys}"
            args = (key, params["value"]) if params.get("value") is not None else (key,)
            await pool.execute(sql, *args)

        return one, pool.close
    if job.kind == "asyncpg_tenant":
        # A tenant-scoped read as the services make it: a transaction that sets the tenant first.
        import asyncpg

        pool = await asyncpg.create_pool(
            params["dsn"], min_size=params["concurrency"], max_size=params["concurrency"]
        )
        sql = params["sql"]
        fixed: list[Any] = list(params["args"])
        ids: int = params.get("ids", 0)

        async def one(i: int) -> None:
            args = [*fixed, f"r{(worker_offset(worker) + i) % ids}"] if ids else fixed
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT set_config('strata.tenant_id', $1, true)", params["tenant"])
                await conn.fetch(sql, *args)

        return one, pool.close
    if job.kind == "asyncpg_query":
        # One statement per call in a transaction that first runs ``setup`` (SET LOCAL ...);
        # each of ``arguments`` is the statement's one argument, or a list of them.
        import asyncpg

        pool = await asyncpg.create_pool(
            params["dsn"], min_size=params["concurrency"], max_size=params["concurrency"]
        )
        arguments: list[Any] = params["arguments"]

        async def one(i: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                for statement in params["setup"]:
                    await conn.execute(statement)
                chosen = arguments[(worker_offset(worker) + i) % len(arguments)]
                await conn.fetch(params["sql"], *(chosen if isinstance(chosen, list) else [chosen]))

        return one, pool.close
    if job.kind == "redis_get":
        import redis.asyncio as aioredis

        client = aioredis.from_url(params["url"], max_connections=params["concurrency"])
        keys = params["keys"]

        async def one(i: int) -> None:
            await client.get(f"bench:k{(worker_offset(worker) + i) % keys}")

        return one, client.aclose
    raise ValueError(f"unknown job kind {job.kind!r}")


async def _worker_main(
    job: Job, worker: int, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    one, close = await _operation(job, worker)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    done = errors = 0
    latencies: list[float] = []
    counter = 0

    async def lane() -> None:
        nonlocal done, errors, counter
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                return
            counter += 1
            try:
                await one(counter)
            except Exception:
                errors += 1
                continue
            ended = time.perf_counter()
            if began >= measure_from and ended <= stop_at:
                done += 1
                if len(latencies) < _SAMPLE:
                    latencies.append((ended - began) * 1000)
                elif random.random() < 0.01:
                    latencies[random.randrange(_SAMPLE)] = (ended - began) * 1000

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    result = close()
    if asyncio.iscoroutine(result):
        await result
    return {"done": done, "errors": errors, "latencies": latencies, "sent": counter}


def _worker(job: Job, worker: int, concurrency: int, warmup_s: float, duration_s: float, queue: Any) -> None:
    import uvloop

    queue.put({**uvloop.run(_worker_main(job, worker, concurrency, warmup_s, duration_s)), "worker": worker})


async def run_python_load(
    job: Job, *, processes: int = 2, concurrency: int = 32, duration_s: float = 5.0, warmup_s: float = 1.0
) -> Measurement:
    """Run ``job`` in ``processes`` workers x ``concurrency`` coroutines; refuse a run with errors."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    per_worker = max(1, concurrency // processes)
    job = Job(job.kind, {**job.params, "concurrency": per_worker})
    workers = [
        context.Process(target=_worker, args=(job, n, per_worker, warmup_s, duration_s, queue), daemon=True)
        for n in range(processes)
    ]
    for process in workers:
        process.start()
    results = [await asyncio.to_thread(queue.get, True, warmup_s + duration_s + 60) for _ in workers]
    for process in workers:
        await asyncio.to_thread(process.join, 10)
    errors = sum(r["errors"] for r in results)
    if errors:
        raise RuntimeError(f"{job.kind}: {errors} calls failed")
    latencies = sorted(x for r in results for x in r["latencies"])
    done = sum(r["done"] for r in results)
    return Measurement(
        requests=done,
        seconds=duration_s,
        rps=done / duration_s,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        tool=f"python x{processes}, {per_worker * processes} in flight",
        sent_per_worker=tuple(r["sent"] for r in sorted(results, key=lambda r: r["worker"])),
    )


def worker_offset(worker: int) -> int:
    """Where worker ``worker`` starts in a job's list of bodies: its calls use 1 + offset, 2 + offset, ..."""
    return worker * 7919

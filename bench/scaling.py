"""The scaling table: KV Get through the gateway, by number of kv and gateway processes.

Each shape is a fresh launcher on the same backends (``STRATA_KV_REPLICAS``,
``STRATA_GATEWAY_REPLICAS``), driven by the same h2load load as the headline
gateway figure. Every process of every shape shares this machine's cores with
the load generator, Postgres and Redis: the cores are recorded beside the
figures, and each figure is also given as a ratio to one process of each,
measured in the same round.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stack import running_strata
from bench.suite import Config, Suite
from devstack.backends import Backends

__all__ = ["SHAPES", "scaling_rounds"]

SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (2, 2))  # (kv processes, gateway processes)


async def scaling_rounds(
    backends: Backends,
    data_dir: Path,
    config: Config,
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Gateway Get throughput per shape, each round measuring every shape; medians over rounds."""
    rounds: list[dict[tuple[int, int], float]] = []
    for number in range(1, config.rounds + 1):
        measured: dict[tuple[int, int], float] = {}
        for kv, gateways in shapes:
            env = {"STRATA_KV_REPLICAS": str(kv), "STRATA_GATEWAY_REPLICAS": str(gateways)}
            async with running_strata(backends, data_dir, env) as target:
                suite = Suite(target, config, backends.migrate_database_url)
                await suite.prepare_kv()
                rps = measured[(kv, gateways)] = (await suite.scenario("kv_get_gateway")).rps
            log(f"round {number} kv_get_gateway kv x{kv} gateway x{gateways} {rps:>10.0f} rps")
        rounds.append(measured)
    base = shapes[0]
    return {
        "cores": os.cpu_count(),
        "load": f"h2load -c{config.connections} -m{config.streams} through the gateway",
        "rows": [
            {
                "kv_processes": kv,
                "gateway_processes": gateways,
                "rps": statistics.median(r[(kv, gateways)] for r in rounds),
                "vs_one_each": statistics.median(r[(kv, gateways)] / r[base] for r in rounds),
            }
            for kv, gateways in shapes
        ],
    }

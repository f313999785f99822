"""The peer: a real etcd (Debian's etcd-server) on loopback, and its KV requests encoded by hand.

etcd's gRPC API takes ``etcdserverpb.RangeRequest`` / ``PutRequest``; only
their first fields are needed here (key = 1, value = 2), so the messages are
encoded directly rather than generating etcd's protos.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator

from devstack.ports import free_port

__all__ = ["PUT", "RANGE", "etcd_available", "etcd_server", "put_request", "range_request"]

RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"


def etcd_available() -> bool:
    """Whether the etcd binary is on PATH."""
    return shutil.which("etcd") is not None


def _field(number: int, value: bytes) -> bytes:
    length = len(value)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(varint) + value


def range_request(key: bytes) -> bytes:
    """``RangeRequest{key}``: one key."""
    return _field(1, key)


def put_request(key: bytes, value: bytes) -> bytes:
    """``PutRequest{key, value}``."""
    return _field(1, key) + _field(2, value)


@contextlib.asynccontextmanager
async def etcd_server() -> AsyncIterator[int]:
    """A single-member etcd with its data in a temporary folder; yields its client port."""
    client, peer = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="strata-etcd-") as data:
        process = await asyncio.create_subprocess_exec(
            "etcd",
            "--name=bench",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}",
            "--log-level=error",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", client)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("etcd did not start")
            yield client
        finally:
            process.kill()
            await process.wait()

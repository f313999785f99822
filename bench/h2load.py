"""h2load (nghttp2's C load generator) sending gRPC-framed requests.

A Python client tops out near a Python server's own speed on the same
cores; h2load does not, so the server is what is measured. h2load knows
HTTP, not gRPC: a call that failed still answers HTTP 200, with its
grpc-status in the trailers and no data. Every run therefore checks the
response bytes: a run whose data is short of ``requests x response size``
had failures and is refused.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Measurement", "grpc_frame", "h2load_available", "run_h2load"]


@dataclass(frozen=True, slots=True)
class Measurement:
    """One load run: completed requests, their rate, latency percentiles (ms)."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    tool: str
    # Python load only: how many calls each worker process began (its i-th used body i + its offset).
    sent_per_worker: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "tool": self.tool,
        }


def grpc_frame(message: bytes) -> bytes:
    """``message`` in gRPC's length-prefixed framing (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load_available() -> bool:
    """Whether the h2load binary is on PATH."""
    return shutil.which("h2load") is not None


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of already sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_h2load(
    address: str,
    path: str,
    message: bytes,
    response_bytes: int,
    *,
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    connections: int = 4,
    streams: int = 16,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
) -> Measurement:
    """Call ``path`` on ``address`` for ``duration_s`` with ``connections`` x ``streams`` in flight.

    ``response_bytes`` is the size of one successful response message (its
    frame adds 5 bytes), or its least size when it grows during the run (a
    revision in a write's answer); fewer data bytes than that many times the
    calls means some calls failed.
    """
    with tempfile.TemporaryDirectory(prefix="strata-h2load-") as folder:
        body = Path(folder) / "body"
        body.write_bytes(grpc_frame(message))
        log = Path(folder) / "log"
        args = [
            "h2load",
            f"--duration={max(1, round(duration_s))}",
            f"--warm-up-time={max(0, round(warmup_s))}",
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            "--threads=1",
            f"--log-file={log}",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            *(f"--header={name}: {value}" for name, value in headers),
            f"http://{address}{path}",
        ]
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await process.communicate()
        text = out.decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"h2load failed ({process.returncode}):\n{text[-2000:]}")
        durations = sorted(
            int(fields[2]) / 1000.0
            for fields in (line.split() for line in log.read_text().splitlines())
            if len(fields) >= 3 and fields[1] == "200"
        )
    summary = _parse_summary(text)
    expected = summary["succeeded"] * (response_bytes + 5)
    if summary["failed"] or summary["errored"] or summary["data"] < expected:
        raise RuntimeError(
            f"{path}: calls failed (data {summary['data']} of {expected} bytes expected):\n{text[-1500:]}"
        )
    return Measurement(
        requests=int(summary["succeeded"]),
        seconds=summary["seconds"],
        rps=summary["rps"],
        p50_ms=percentile(durations, 0.50),
        p99_ms=percentile(durations, 0.99),
        tool=f"h2load -c{connections} -m{streams}",
    )


def _parse_summary(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("finished in"):
            found["seconds"] = float(words[2].rstrip("s"))
            found["rps"] = float(words[3])
        elif line.startswith("requests:"):
            found["succeeded"] = int(words[words.index("succeeded") - 1])
            found["failed"] = int(words[words.index("failed") - 1])
            found["errored"] = int(words[words.index("errored") - 1])
        elif line.startswith("traffic:"):
            found["data"] = int(line.rsplit("(", 1)[1].split(")")[0])
    if {"seconds", "rps", "succeeded", "data"} - set(found):
        raise RuntimeError(f"unexpected h2load output:\n{text[-1500:]}")
    return found


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)

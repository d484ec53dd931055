"""Small measuring helpers: percentiles, and a process's RSS, threads and CPU from /proc."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    threads: int
    cpu_s: float


def proc_sample(pid: int) -> ProcSample:
    """RSS (KiB), thread count and user+system CPU seconds of ``pid``."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return ProcSample(rss, threads, cpu)


def cpu_seconds(pids: Sequence[int]) -> float:
    return sum(proc_sample(pid).cpu_s for pid in pids)


async def settle(pids: Sequence[int], *, idle_share: float = 0.05, limit: float = 15.0) -> None:
    """Wait until the processes use under ``idle_share`` of a core (leftover work drained)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    step = 0.2
    while loop.time() < deadline:
        before = cpu_seconds(pids)
        await asyncio.sleep(step)
        if (cpu_seconds(pids) - before) / step < idle_share * max(1, len(pids)):
            return


def machine() -> dict[str, str]:
    """What the run ran on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }

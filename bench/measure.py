"""Small measuring helpers: percentiles, and a process's RSS, threads and CPU from /proc."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
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
    """Wait until the processes use under ``idle_share`` of a core (leftover work drained),
    judged over steps of 0.1 s: at 5 % that is under one 10 ms tick of /proc's CPU time per
    process, so any work left shows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    step = 0.1
    while loop.time() < deadline:
        before = cpu_seconds(pids)
        await asyncio.sleep(step)
        if (cpu_seconds(pids) - before) / step < idle_share * max(1, len(pids)):
            return


def _ping_pong_us(rounds: int, idle_s: float = 0.0) -> float:
    """Median round trip, in µs, of one byte between this process and a forked child over two
    pipes: two wake-ups of a sleeping process (usually on the other core). Every hop of a
    relayed request (client → broker → Redis → publisher → upstream and back) pays one.
    ``idle_s``: a pause before each round, as between requests at concurrency 1 (a VM's
    cores that went idle take longer to wake)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child echoes until the parent closes its end
        try:
            os.close(w1)
            os.close(r2)
            while os.read(r1, 1):
                os.write(w2, b"x")
        finally:
            os._exit(0)
    os.close(r1)
    os.close(w2)
    times = []
    try:
        for _ in range(rounds):
            if idle_s:
                time.sleep(idle_s)
            started = time.perf_counter()
            os.write(w1, b"x")
            os.read(r2, 1)
            times.append(time.perf_counter() - started)
    finally:
        os.close(w1)
        os.close(r2)
        os.waitpid(pid, 0)
    return statistics.median(times) * 1e6


# The pause before each round of the "after idle" wake-up figure: about the gap between two
# hops of one relayed request at concurrency 1.
IDLE_GAP_S = 0.002


# A child process serving one TCP connection with asyncio, echoing each byte; at the end it
# prints its CPU time (user + sys) per echo.
_ECHO_SERVER = """
import asyncio, resource, sys
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
async def main():
    done = asyncio.Event()
    async def serve(reader, writer):
        n, start = 0, None
        while data := await reader.read(16):
            if start is None:
                start = cpu()
            else:
                n += 1
            writer.write(data)
        print((cpu() - start) / max(n, 1) * 1e6, flush=True)
        done.set()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done.wait()
asyncio.run(main())
"""


def _echo_cpu_us(rounds: int, idle_s: float) -> float:
    """CPU time, in µs, that an asyncio process spends per request-and-answer on a kept TCP
    connection (read one byte, write it back), with ``idle_s`` between requests: what each
    process on a relayed request's path pays per hop in the event loop, the socket calls and
    being woken from idle, before doing any work of its own. On a VM this moves with how
    costly the host makes a switch between processes; a faster Python loop does not imply a
    lower figure."""
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(rounds + 1):
                time.sleep(idle_s)
                sock.sendall(b"x")
                sock.recv(16)
        return float(child.stdout.readline())
    except BaseException:
        child.kill()  # it would wait for a connection that is not coming
        raise
    finally:
        child.wait(timeout=10)


def calibrate() -> dict[str, str]:
    """Figures that tell this host from another, since every other figure depends on them:
    the cross-process wake-up round trip, back to back and after a short idle gap, the CPU
    an asyncio process spends per echo, and a fixed pure-Python loop (best of 3)."""
    loop_s = []
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        loop_s.append(time.perf_counter() - started)
    return {
        "wakeup_rtt_us": f"{_ping_pong_us(2000):.0f}",
        "wakeup_idle_rtt_us": f"{_ping_pong_us(200, IDLE_GAP_S):.0f}",
        "echo_cpu_us": f"{_echo_cpu_us(200, IDLE_GAP_S):.0f}",
        "python_loop_ms": f"{min(loop_s) * 1000:.0f}",
    }


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

"""``python -m bench.run --roles``: where a relayed request's CPU goes, process by process.

Starts the 3-process broker (PostgreSQL + Redis), the upstream and a publisher line (the bench
publisher, or the agent with ``--lines agent``) with its stream on worker 0, then, for each
transport, sends ``--roles-requests`` non-streaming requests:

- by default one at a time, 2 ms apart, all to worker 1: what one request costs where it
  waits between hops (concurrency 1);
- with ``--roles-rate R``, open loop at R requests/s, to the workers in turn, from the
  harness's load generator (:mod:`bench.loadgen`, as in the throughput search): what a
  request costs at that load, the load generator included, and the rate the machine's cores
  would allow at that cost.

Before and after, it reads ``/proc`` of every process on the path: user and system CPU, and
voluntary context switches (each a wait that ended: a wake-up), per relayed request
(:func:`role`: what each worker does). At c=1 the requests come from this process (aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from tests.cluster import REDIS_URL
from tests.services_up import services_up

from .lines import AgentLine, BenchLine, Line
from .measure import CLOCK_TICKS, pct, settle
from .rpc import Child
from .scenarios import progress, start_line

WORKERS = ("worker 1", "worker 0", "worker 2")
OTHERS = ("redis-server", "upstream")
LOADGEN = "load generator"


def role(worker: str, transport: str, spread: bool) -> str:
    """What ``worker`` does for the relayed requests: the client's calls (all on worker 1 at
    c=1, a third each at a rate), the stream (worker 0), and over SSE the answer POSTs (the
    bench publisher sends them to every worker in turn; the agent spreads them by task over
    its ``--broker`` URLs). Over WebSocket the answers come on the socket."""
    parts = []
    if spread:
        parts.append("a third of the client's calls")
    elif worker == "worker 1":
        parts.append("the client's call: opens the task, waits for the answer on its channel")
    if worker == "worker 0":
        parts.append(
            "holds the stream: sends the task down it"
            if transport == "sse"
            else "holds the socket: sends the task, takes the answer (one Redis script)"
        )
    if transport == "sse":
        parts.append("a third of the answer POSTs")
    return "; ".join(parts) or "idle"


@dataclass(frozen=True)
class Counters:
    user_s: float
    system_s: float
    wakeups: int  # voluntary context switches, all threads


def counters(pid: int) -> Counters:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    wakeups = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                wakeups += int(line.split()[1])
    return Counters(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, wakeups)


Call = Callable[[str], Awaitable[bool]]


async def one_at_a_time(call: Call, url: str, requests: int) -> tuple[list[float], int]:
    """``requests`` calls to ``url``, one at a time, 2 ms apart: latencies and failures."""
    latencies: list[float] = []
    failed = 0
    for _ in range(requests):
        start = time.perf_counter()
        failed += not await call(url)
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.002)
    return latencies, failed


async def measure(
    transport: str,
    line_name: str,
    requests: int,
    rate: float,
    upstream: asyncio.subprocess.Process,
    upstream_url: str,
) -> None:
    from .run import start_setup

    setup = await start_setup("services")
    log_dir = Path(tempfile.mkdtemp(prefix="mcpd-roles-"))
    line: Line = AgentLine(log_dir) if line_name == "agent" else BenchLine(log_dir)
    publisher = f"{line.name} publisher"
    llm = f"roles-{transport}-{int(time.time() * 1000) % 100000}"
    # At a rate, the load comes from the harness's own load generator, as in the throughput
    # search; at c=1, from this process.
    loadgen = await Child.spawn("loadgen", "bench.loadgen", log_dir) if rate else None
    try:
        await start_line(line, setup, transport, llm, upstream_url)
        with redis.Redis.from_url(REDIS_URL) as client:
            redis_pid = int(client.info("server")["process_id"])
        pids = dict(zip(["worker 0", "worker 1", "worker 2"], setup.pids, strict=True))
        pids.update({publisher: line.pids()[0], "redis-server": redis_pid})
        pids["upstream"] = upstream.pid
        if loadgen is not None:
            pids[LOADGEN] = loadgen.pid
        urls = [f"{base}/v1/chat/completions" for base in setup.urls]
        headers = {"Authorization": f"Bearer {setup.client_token}"}
        body = {"model": llm, "messages": [{"role": "user", "content": "hi"}]}
        targets = [{"url": url, "headers": headers, "body": body} for url in urls]
        # Every call has a deadline: a relayed answer here takes milliseconds.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def call(url: str) -> bool:
                try:
                    async with http.post(url, json=body, headers=headers) as response:
                        await response.read()
                        return response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            async def load(count: int) -> tuple[list[float], int]:
                """``count`` requests: latencies (s) and failures."""
                if loadgen is None:
                    return await one_at_a_time(call, urls[1], count)
                result = await loadgen.call(
                    "open_loop", targets=targets, rate=rate, duration=count / rate
                )
                return [ms / 1000 for ms in result["lat"]], int(result["failed"])

            _, failed = await load(100)  # warm-up: connections, caches
            if failed:
                raise RuntimeError(f"{failed} of 100 warm-up calls failed")
            await settle(setup.pids)
            before = {name: counters(pid) for name, pid in pids.items()}
            began = time.perf_counter()
            latencies, failed = await load(requests)
            seconds = time.perf_counter() - began
            after = {name: counters(pid) for name, pid in pids.items()}
    finally:
        await line.stop()
        if loadgen is not None:
            await loadgen.close()
        await asyncio.to_thread(setup.broker.stop)
    how = (
        f"open loop at {rate:g}/s to the workers in turn, {seconds:.1f} s; latency from each "
        "call's scheduled time"
        if rate
        else "one at a time, 2 ms apart, to worker 1"
    )
    print(
        f"\n3 procs, PostgreSQL + Redis, {transport}, {publisher}: {requests} requests, {how}; "
        f"relayed p50 {1000 * pct(latencies, 50):.2f} ms, p99 {1000 * pct(latencies, 99):.2f} ms, "
        f"{failed} failed\n"
    )
    print("| process | role | user CPU (ms) | system CPU (ms) | wake-ups |")
    print("| --- | --- | --: | --: | --: |")
    total = 0.0
    for name in [*WORKERS, publisher, *OTHERS, *([LOADGEN] if rate else [])]:
        b, a = before[name], after[name]
        user, system = a.user_s - b.user_s, a.system_s - b.system_s
        total += user + system
        what = role(name, transport, bool(rate)) if name in WORKERS else ""
        print(
            f"| {name} | {what} | {1000 * user / requests:.2f} | {1000 * system / requests:.2f} "
            f"| {(a.wakeups - b.wakeups) / requests:.1f} |"
        )
    per_request = total / requests
    print(f"\n(per relayed request; these processes: {1000 * per_request:.2f} ms of CPU in all)")
    if rate:
        cores = os.cpu_count() or 1
        print(
            f"{100 * total / seconds:.0f} % of one core in all, of the machine's {cores}: at "
            f"{1000 * per_request:.2f} ms a request they would be full at "
            f"{cores / per_request:.0f} requests/s"
        )


async def run_roles(args: argparse.Namespace) -> int:
    from .run import start_upstream

    ok, why = services_up()
    if not ok:
        print(f"--roles needs PostgreSQL and Redis: {why}", file=sys.stderr)
        return 2
    line = (args.lines or "bench").split(",")[0]
    if line not in ("bench", "agent"):
        print(f"--roles takes one line, bench or agent, not {line!r}", file=sys.stderr)
        return 2
    upstream, upstream_url = await start_upstream(Path(tempfile.mkdtemp(prefix="mcpd-roles-")))
    try:
        for transport in [t for t in args.transports.split(",") if t]:
            at = f"{args.roles_rate:g}/s" if args.roles_rate else "c=1"
            progress(f"roles: {transport}, {line} publisher, {args.roles_requests} requests, {at}")
            await measure(
                transport, line, args.roles_requests, args.roles_rate, upstream, upstream_url
            )
    finally:
        upstream.kill()
        await upstream.wait()
    return 0

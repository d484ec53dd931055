"""``python -m bench.run --roles``: where one relayed request's CPU goes, process by process.

Starts the 3-process broker (PostgreSQL + Redis), the upstream and the bench publisher with
its stream on worker 0, then sends ``--roles-requests`` non-streaming requests one at a time,
2 ms apart, all to worker 1, for each transport. Before and after, it reads ``/proc`` of every
process on the path: user and system CPU, and voluntary context switches (each a wait that
ended: a wake-up), per relayed request (``ROLES``: what each worker does). The requests come
from this process (aiohttp), not from the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from tests.cluster import REDIS_URL
from tests.services_up import services_up

from .lines import BenchLine
from .measure import CLOCK_TICKS, pct, settle
from .scenarios import progress, start_line

PROCESSES = ("worker 1", "worker 0", "worker 2", "bench publisher", "redis-server", "upstream")
# The bench publisher sends its answers to every worker in turn: over SSE each worker takes a
# third of the answer POSTs (one Redis script each); over WebSocket they come on the socket.
ROLES = {
    "sse": {
        "worker 1": "the client's call: opens the task, waits for the answer on its channel; "
        "a third of the answer POSTs",
        "worker 0": "holds the stream: sends the task down it; a third of the answer POSTs",
        "worker 2": "a third of the answer POSTs",
    },
    "ws": {
        "worker 1": "the client's call: opens the task, waits for the answer on its channel",
        "worker 0": "holds the socket: sends the task, takes the answer (one Redis script)",
        "worker 2": "idle",
    },
}


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


async def measure(
    transport: str, requests: int, upstream: asyncio.subprocess.Process, upstream_url: str
) -> None:
    from .run import start_setup

    setup = await start_setup("services")
    line = BenchLine(Path(tempfile.mkdtemp(prefix="mcpd-roles-")))
    llm = f"roles-{transport}-{int(time.time() * 1000) % 100000}"
    try:
        await start_line(line, setup, transport, llm, upstream_url)
        with redis.Redis.from_url(REDIS_URL) as client:
            redis_pid = int(client.info("server")["process_id"])
        pids = dict(
            zip(
                ["worker 0", "worker 1", "worker 2", "bench publisher", "redis-server"],
                [*setup.pids, line.pids()[0], redis_pid],
                strict=True,
            )
        )
        pids["upstream"] = upstream.pid
        url = f"{setup.urls[1]}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {setup.client_token}"}
        body = {"model": llm, "messages": [{"role": "user", "content": "hi"}]}
        latencies: list[float] = []
        # Every call has a deadline: a relayed answer here takes milliseconds.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def one() -> float:
                start = time.perf_counter()
                async with http.post(url, json=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"relayed call answered {response.status}")
                return time.perf_counter() - start

            for _ in range(100):  # warm-up: connections, caches
                await one()
            await settle(setup.pids)
            before = {name: counters(pid) for name, pid in pids.items()}
            for _ in range(requests):
                latencies.append(await one())
                await asyncio.sleep(0.002)
            after = {name: counters(pid) for name, pid in pids.items()}
    finally:
        await line.stop()
        await asyncio.to_thread(setup.broker.stop)
    print(
        f"\n3 procs, PostgreSQL + Redis, {transport}, bench publisher: {requests} requests, "
        f"one at a time, 2 ms apart; relayed p50 {1000 * pct(latencies, 50):.2f} ms "
        f"(this process's aiohttp client)\n"
    )
    print("| process | role | user CPU (ms) | system CPU (ms) | wake-ups |")
    print("| --- | --- | --: | --: | --: |")
    for name in PROCESSES:
        b, a = before[name], after[name]
        print(
            f"| {name} | {ROLES[transport].get(name, '')} | "
            f"{1000 * (a.user_s - b.user_s) / requests:.2f} | "
            f"{1000 * (a.system_s - b.system_s) / requests:.2f} | "
            f"{(a.wakeups - b.wakeups) / requests:.1f} |"
        )
    print("\n(per relayed request)")


async def run_roles(args: argparse.Namespace) -> int:
    from .run import start_upstream

    ok, why = services_up()
    if not ok:
        print(f"--roles needs PostgreSQL and Redis: {why}", file=sys.stderr)
        return 2
    upstream, upstream_url = await start_upstream(Path(tempfile.mkdtemp(prefix="mcpd-roles-")))
    try:
        for transport in [t for t in args.transports.split(",") if t]:
            progress(f"roles: {transport}, {args.roles_requests} requests")
            await measure(transport, args.roles_requests, upstream, upstream_url)
    finally:
        upstream.kill()
        await upstream.wait()
    return 0

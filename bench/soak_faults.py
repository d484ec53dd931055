"""The soak's faults (bench/soak.py, issue 22): a SIGTERM rolling restart of every worker and
a restart of the broker's Redis (a redis-server of the soak's own, tests/faults.py
PrivateRedis, never the shared one), each while a round's load runs; and how to read what
the load's clients got from them.

A fault's outcomes are the load generator's failure counts, named by what the client saw
(``503 state_unavailable``, ``stream error 502 publisher_disconnected``, ``cut: ...``). A
fault is handled when every failure is an explicit refusal — a 502, 503 or 504 with a code,
or a stream ended by an error event with one — and none a 500, a dropped connection, a
timeout or a stream that ended silently.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.faults import PrivateRedis

from .http import JSON, session
from .scenarios import Setup, progress

# Takes these workers' base URLs out of the clients' and the publisher's rotation (the
# others back in).
OutOfRotation = Callable[[list[str]], Awaitable[None]]

ROLLING = "rolling restart"
REDIS = "redis restart"
# The round (0-based) each fault runs in: early, so that the rounds after it still judge the
# restarted workers' memory (soak.py, per worker life), and after a first clean round.
FAULT_ROUNDS = {1: ROLLING, 2: REDIS}
# A fault starts this far into its round, so the load runs before, during and after it.
START_SHARE = 0.15
READY_SECONDS = 60.0
EXPLICIT = re.compile(r"^(stream error )?50[234] [a-z_]+$")


@dataclass
class FaultReport:
    name: str
    outcomes: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    note: str = ""
    back_after_s: float | None = None  # from the fault's end to every worker relaying

    def unexplained(self) -> dict[str, int]:
        """The failures that were not an explicit refusal."""
        return {k: n for k, n in self.outcomes.items() if k != "answered" and not EXPLICIT.match(k)}


def outcome_key(error: str) -> str:
    """The load generator's error text (bench/loadgen.py), as an outcome's name."""
    status = re.match(r"status (\d+)\s*([a-z_]*)", error)
    if status:
        return f"{status.group(1)} {status.group(2)}".strip()
    if error.startswith("error event: "):
        try:
            body = json.loads(error[len("error event: ") :])["error"]
            return f"stream error {body.get('status') or 502} {body.get('code') or ''}".strip()
        except (ValueError, KeyError, TypeError):
            return "stream error (unparsed)"
    return error


def merge_outcomes(results: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        for error, n in result.get("outcomes", {}).items():
            key = outcome_key(error)
            counts[key] = counts.get(key, 0) + n
    return counts


async def _ready(url: str, deadline: float) -> None:
    async with session() as http:
        while True:
            try:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after a restart")
            await asyncio.sleep(0.1)


async def rolling_restart(setup: Setup, out: OutOfRotation) -> str:
    """SIGTERM each worker in turn, start it again and wait for its /readyz, as an operator
    does (README "Restarts and upgrades"); the load generator and the publisher take it out
    of their rotation first and back after, as a load balancer does. Returns each worker's
    exit code and drain time."""
    done = []
    for i in range(setup.n):
        proc = setup.broker.procs[i]
        assert proc is not None
        await out([setup.broker.url(i)])
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, READY_SECONDS)
        drained = time.monotonic() - began
        setup.broker.procs[i] = None
        await asyncio.to_thread(setup.broker.start_worker, i)
        await _ready(setup.broker.url(i), time.monotonic() + READY_SECONDS)
        await out([])
        done.append(
            f"w{i} exit {code} after {drained:.1f} s, ready {time.monotonic() - began:.1f} s"
        )
    return "; ".join(done)


async def redis_restart(redis: PrivateRedis) -> str:
    await asyncio.to_thread(redis.restart)
    return "redis-server stopped and started again, empty"


async def back_after(setup: Setup, llm: str, since: float, limit: float = 60.0) -> float:
    """Seconds from ``since`` until a relayed request is answered on every worker."""
    body = json.dumps({"model": llm, "messages": [{"role": "user", "content": "back?"}]})
    headers = {"Authorization": f"Bearer {setup.client_token}", **JSON}
    async with session() as http:
        for url in setup.urls:
            while True:
                try:
                    async with http.post(
                        f"{url}/v1/chat/completions", data=body, headers=headers
                    ) as response:
                        last = f"{response.status} {(await response.read())[:200]!r}"
                        if response.status == 200:
                            break
                except aiohttp.ClientError as exc:
                    last = repr(exc)
                if time.monotonic() - since > limit:
                    raise RuntimeError(f"{url} not relaying {limit:g} s after the fault: {last}")
                await asyncio.sleep(0.05)
    return time.monotonic() - since


async def run_fault(
    name: str,
    setup: Setup,
    llm: str,
    round_seconds: float,
    redis: PrivateRedis | None,
    out: OutOfRotation,
) -> FaultReport:
    """Wait START_SHARE of the round, then do the fault; how long it took to be served
    again."""
    await asyncio.sleep(START_SHARE * round_seconds)
    report = FaultReport(name)
    if name == ROLLING:
        report.note = await rolling_restart(setup, out)
    else:
        assert redis is not None
        report.note = await redis_restart(redis)
    report.back_after_s = await back_after(setup, llm, time.monotonic())
    progress(f"  {name}: {report.note}; relaying on every worker {report.back_after_s:.2f} s later")
    return report


async def row_state(setup: Setup, llm: str) -> dict[str, object]:
    """The LLM's row as the API shows it: its status and the tasks in flight over its
    backends (a stuck row: inactive while its publisher is connected, or slots never
    freed)."""
    headers = {"Authorization": f"Bearer {setup.client_token}"}
    async with (
        session() as http,
        http.get(f"{setup.urls[0]}/api/v1/llms/{llm}", headers=headers) as response,
    ):
        row = await response.json(content_type=None)
    if response.status != 200:
        return {"status": f"HTTP {response.status}", "inFlight": -1}
    backends = row.get("backends") or []
    return {
        "status": row.get("status"),
        "inFlight": sum(int(b.get("inFlight") or 0) for b in backends),
    }

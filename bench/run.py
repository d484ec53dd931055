"""``make bench`` / ``make bench-quick``: start everything, measure, print the table.

    python -m bench.run            # full run (about 10 minutes on 2 cores)
    python -m bench.run --quick    # regression guard: the same rows at small counts (< 1 min)
    python -m bench.run --profile  # py-spy on one worker under load (needs py-spy)
    python -m bench.run --roles    # CPU and wake-ups per request, process by process, at c=1
    python -m bench.run --roles --roles-rate 450   # the same at a rate, the load generator included

Processes: the baseline upstream, the load generator and each publisher run as separate
processes next to the daphne workers (``tests.cluster.Broker``): 1 process on SQLite with
the in-memory layer, and 3 on PostgreSQL + Redis when those answer.
See docs/benchmarks.md for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.cluster import Broker, free_port, local_calls_skip_proxies
from tests.services_up import services_up

from .lines import AgentLine, BenchLine, Line, agent_available
from .measure import calibrate, machine, settle
from .report import markdown, summary
from .rpc import Child, open_log
from .scenarios import FULL, QUICK, Bench, Setup, progress

SETUPS = {
    "embedded": ("1 proc, SQLite + in-memory layer", False, 1),
    "services": ("3 procs, PostgreSQL + Redis", True, 3),
}
SCENARIOS = (
    "latency",
    "limited",
    "big",
    "streaming",
    "throughput",
    "capacity",
    "memory",
    "wake",
)
BROKER_ENV = {"MCPD_LOG_LEVEL": "WARNING"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (< 1 minute)")
    parser.add_argument("--setups", default="embedded,services", help="embedded,services")
    parser.add_argument("--transports", default="sse,ws", help="sse,ws")
    parser.add_argument(
        "--lines",
        default=None,
        help="publisher lines: bench,agent (default: both for a full run, bench for --quick; "
        "the agent only when it is present)",
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help=",".join(SCENARIOS))
    parser.add_argument("--agent-cmd", default=None, help="the agent's command template")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--profile", action="store_true", help="py-spy profile instead")
    parser.add_argument(
        "--profile-target",
        choices=("worker", "agent"),
        default="worker",
        help="profile daphne worker 0 under the bench publisher, or the mcpd-publish agent",
    )
    parser.add_argument("--soak", action="store_true", help="soak run instead (make soak)")
    parser.add_argument("--soak-rounds", type=int, default=10)
    parser.add_argument("--soak-round-seconds", type=float, default=30.0)
    parser.add_argument("--soak-rate", type=float, default=150.0, help="requests/s")
    parser.add_argument(
        "--roles",
        action="store_true",
        help="CPU and wake-ups per relayed request of each process on the path, on 3 "
        "processes, instead (at c=1, or at --roles-rate; the line: --lines bench or agent)",
    )
    parser.add_argument("--roles-requests", type=int, default=1500)
    parser.add_argument(
        "--roles-rate",
        type=float,
        default=0.0,
        help="requests/s, open loop to every worker, for --roles (default: one at a time)",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-rate", type=float, default=40.0, help="requests/s")
    return parser.parse_args(argv)


async def start_upstream(log_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    with open_log(log_dir / "upstream.log") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.upstream",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    if not line.startswith(b"ready"):
        raise RuntimeError(f"upstream did not start: {line!r}")
    return proc, f"http://127.0.0.1:{port}/v1"


async def start_setup(key: str, env: dict[str, str] | None = None) -> Setup:
    label, services, n = SETUPS[key]
    broker = Broker(n, services=services, env={**BROKER_ENV, **(env or {})})
    await asyncio.to_thread(broker.start)
    client_token, publisher_token = await asyncio.to_thread(
        broker.new_tokens, "client", "publisher"
    )
    return Setup(key, label, broker, client_token, publisher_token)


async def sdk_check(setup: Setup, llm: str) -> str:
    """The relayed answer parses with the openai SDK (non-streaming and streaming)."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{setup.urls[-1]}/v1", api_key=setup.client_token, max_retries=0
    )
    try:
        answer = await client.chat.completions.create(
            model=llm, messages=[{"role": "user", "content": "hi"}]
        )
        text = answer.choices[0].message.content or ""
        pieces = []
        stream = await client.chat.completions.create(
            model=llm, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=8
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        ok = bool(text) and len(pieces) == 8
        return f"{'PASS' if ok else 'FAIL'}: {text!r}, {len(pieces)} streamed chunks"
    except openai.OpenAIError as exc:
        return f"FAIL: {exc!r}"
    finally:
        await client.close()


def make_lines(args: argparse.Namespace, log_dir: Path, notes: list[str]) -> list[Line]:
    lines: list[Line] = []
    wanted = (args.lines or ("bench" if args.quick else "bench,agent")).split(",")
    if "bench" in wanted:
        lines.append(BenchLine(log_dir))
    if "agent" in wanted:
        ok, why = agent_available()
        if ok:
            lines.append(AgentLine(log_dir, args.agent_cmd))
        else:
            notes.append(f"agent line skipped: {why}")
    return lines


async def run_combo(
    bench: Bench, setup: Setup, transport: str, line: Line, only: set[str], notes: list[str]
) -> None:
    llm = f"bench-{setup.key}-{transport}-{line.name}-{int(time.time() * 1000) % 100000}"
    progress(f"{setup.key} / {transport} / {line.name}: starting the publisher")
    try:
        await bench.start_line(line, setup, transport, llm)
    except Exception as exc:
        failed(bench, setup, transport, line.name, "publisher start", exc, notes)
        await line.stop()
        return
    try:
        if (setup.key, line.name) not in bench.sdk_checked and not bench.sizes.quick:
            bench.sdk_checked.add((setup.key, line.name))
            check = await sdk_check(setup, llm)
            notes.append(f"openai SDK through {setup.key}/{transport}/{line.name}: {check}")
        for name in ("latency", "limited", "big", "streaming", "throughput", "capacity"):
            # Capacity is the broker's: measured with the bench line only (it is the longest).
            if name in only and (name != "capacity" or isinstance(line, BenchLine)):
                progress(f"{setup.key} / {transport} / {line.name}: {name}")
                try:
                    await getattr(bench, name)(setup, transport, line, llm)
                except Exception as exc:
                    failed(bench, setup, transport, line.name, name, exc, notes)
                await settle(setup.pids + line.pids())
    finally:
        await line.stop()
    if "wake" in only and setup.n >= 3:
        progress(f"{setup.key} / {transport} / {line.name}: wake")
        try:
            await bench.wake(setup, transport, line)
        except Exception as exc:
            failed(bench, setup, transport, line.name, "wake", exc, notes)


def failed(
    bench: Bench,
    setup: Setup,
    transport: str,
    line: str,
    scenario: str,
    exc: BaseException,
    notes: list[str],
) -> None:
    """A scenario that could not finish is a FAIL row, and the run goes on."""
    what = f"{type(exc).__name__}: {exc}"[:300]
    progress(f"{setup.key} / {transport} / {line}: {scenario} did not complete: {what}")
    notes.append(f"{setup.key}/{transport}/{line}: {scenario} did not complete: {what}")
    row = bench.row(setup, transport, line, f"{scenario}: did not complete", "")
    row.goal, row.verdict, row.note = "completes", "FAIL", what


async def main_async(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    log_dir = Path(tempfile.mkdtemp(prefix="mcpd-bench-"))
    started = time.monotonic()
    host = machine() | calibrate()
    notes: list[str] = []
    only = set(args.only.split(","))
    setups = [s for s in args.setups.split(",") if s]
    if "services" in setups:
        up, why = services_up()
        if not up:
            notes.append(f"3-process setup skipped: {why}")
            setups.remove("services")
    lines = make_lines(args, log_dir, notes)
    upstream, upstream_url = await start_upstream(log_dir)
    loadgen = await Child.spawn("loadgen", "bench.loadgen", log_dir)
    bench = Bench(sizes, loadgen, upstream_url, log_dir)
    progress(f"logs in {log_dir}; {'quick' if args.quick else 'full'} run")
    try:
        if "throughput" in only:
            await bench.direct_baseline_rate()
        if "capacity" in only:
            await bench.direct_baseline_capacity()
        # Both brokers start at once, before any measurement (an idle broker costs nothing).
        progress("starting the brokers: " + ", ".join(SETUPS[k][0] for k in setups))
        results = await asyncio.gather(
            *(start_setup(key) for key in setups), return_exceptions=True
        )
        running: list[Setup] = []
        for key, result in zip(setups, results, strict=True):
            if isinstance(result, BaseException):
                notes.append(f"{key} broker did not start: {result!r}")
            else:
                running.append(result)
        try:
            for setup in running:
                for transport in args.transports.split(","):
                    for line in lines:
                        await run_combo(bench, setup, transport, line, only, notes)
                    if "memory" in only:
                        progress(f"{setup.key} / {transport}: memory (idle sessions, waiting)")
                        try:
                            await bench.memory(setup, transport)
                        except Exception as exc:
                            failed(bench, setup, transport, "bench", "memory", exc, notes)
        finally:
            for setup in running:
                for i in range(setup.n):
                    source = setup.broker.tmp / f"worker{i}.log"
                    with contextlib.suppress(OSError):
                        shutil.copy(source, log_dir / f"{setup.key}-worker{i}.log")
            await asyncio.gather(*(asyncio.to_thread(s.broker.stop) for s in running))
    finally:
        await loadgen.close()
        upstream.kill()
        await upstream.wait()
    elapsed = time.monotonic() - started
    host["loadavg_end"] = machine()["loadavg"]
    table = markdown(bench.rows)
    header = (
        f"mcpd bench ({'quick' if args.quick else 'full'}), "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, {elapsed:.0f} s; "
        f"{host['nproc']} x {host['cpu']}, {host['ram']} RAM; "
        f"load average {host['loadavg']} at start, {host['loadavg_end']} at end; "
        f"calibration: process wake-up round trip {host['wakeup_rtt_us']} µs "
        f"({host['wakeup_idle_rtt_us']} µs after 2 ms idle), "
        f"asyncio echo {host['echo_cpu_us']} µs CPU, "
        f"1e6-step Python loop {host['python_loop_ms']} ms"
    )
    print()
    print(header)
    print()
    print(table)
    print()
    for note in notes:
        print(f"note: {note}")
    print(summary(bench.rows))
    print(f"logs: {log_dir}")
    if args.markdown:
        args.markdown.write_text(f"{header}\n\n{table}\n\n" + "".join(f"- {n}\n" for n in notes))
    if args.json:
        payload: dict[str, Any] = {
            "command": shlex.join(["python", "-m", "bench.run", *sys.argv[1:]]),
            "machine": host,
            "elapsed_s": elapsed,
            "sizes": sizes.__dict__,
            "notes": notes,
            "rows": [r.as_dict() for r in bench.rows],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    local_calls_skip_proxies()  # the agent and every client here call this machine only
    if args.profile:
        from .profile import run_profile

        return asyncio.run(run_profile(args))
    if args.roles:
        from .roles import run_roles

        return asyncio.run(run_roles(args))
    if args.soak:
        from .soak import run_soak

        return asyncio.run(run_soak(args))
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())

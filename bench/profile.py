"""``python -m bench.run --profile``: py-spy on one daphne worker (or, with
``--profile-target agent``, on the ``mcpd-publish`` agent) under relayed load.

Starts a broker, a publisher (the bench publisher; the agent for ``--profile-target agent``)
and the upstream, drives open-loop non-streaming requests
(and 8 streams at a time) at a fixed rate, and records worker 0 (or the agent) with ``py-spy record
--nonblocking --gil``: samples of whichever thread holds the GIL, i.e. CPU spent in Python,
not idle threads (py-spy is not a dependency: ``.venv/bin/pip install py-spy``). Prints where
the samples fall: by package, by leaf function (self), by function on the stack (inclusive),
and mcpd's own functions (inclusive).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from .lines import AgentLine, BenchLine, Line
from .measure import cpu_seconds, settle
from .rpc import Child
from .scenarios import QUICK, Bench, progress

# Frames that only say "the event loop ran something".
PLUMBING = {"<module>", "run", "run_forever", "_run_once", "_run", "main", "run_until_complete"}


def _frame_parts(frame: str) -> tuple[str, str]:
    """``func (path/file.py:12)`` → (func, path/file.py)."""
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")").rsplit(":", 1)[0]


def _package(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    head = path.split("/", 1)[0]
    if head.endswith(".py"):
        return f"stdlib:{head[:-3]}"
    return head or "?"


def summarize(raw: str, top: int = 20) -> str:
    """Collapsed stacks (py-spy --format raw) → the text report."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        name, path = _frame_parts(leaf)
        self_time[f"{name} ({path})"] += count
        packages[_package(path)] += count
        seen: set[str] = set()
        for frame in frames:
            name, path = _frame_parts(frame)
            key = f"{name} ({path})"
            if name in PLUMBING or key in seen:
                continue
            seen.add(key)
            inclusive[key] += count
    if not total:
        return "no samples (is py-spy allowed to ptrace?)"

    def block(title: str, counter: Counter[str], n: int) -> list[str]:
        out = [f"{title}:"]
        for key, count in counter.most_common(n):
            out.append(f"  {100 * count / total:5.1f}%  {key}")
        return out

    lines = [f"{total} samples"]
    lines += block("self time by package", packages, 12)
    lines += block("self time by function", self_time, top)
    lines += block("inclusive time by function", inclusive, top + 10)
    mcpd = Counter({k: v for k, v in inclusive.items() if "virtual_llms/" in k})
    lines += block("inclusive time, mcpd's own functions", mcpd, top)
    return "\n".join(lines)


async def run_profile(args: argparse.Namespace) -> int:
    from .run import SETUPS, start_setup, start_upstream

    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    setup_key = args.setups.split(",")[0]
    transport = args.transports.split(",")[0]
    rate = args.profile_rate
    log_dir = Path(tempfile.mkdtemp(prefix="mcpd-profile-"))
    upstream, upstream_url = await start_upstream(log_dir)
    loadgen = await Child.spawn("loadgen", "bench.loadgen", log_dir)
    bench = Bench(QUICK, loadgen, upstream_url, log_dir)
    setup = await start_setup(setup_key)
    line: Line = (
        AgentLine(log_dir, args.agent_cmd) if args.profile_target == "agent" else BenchLine(log_dir)
    )
    out = log_dir / f"{args.profile_target}.raw"
    try:
        llm = f"profile-{setup_key}-{transport}"
        await bench.start_line(line, setup, transport, llm)
        unary = bench.relayed(setup, llm)
        streams = bench.relayed(setup, llm, stream=True, interval_ms=20)
        await loadgen.call("open_loop", targets=unary, rate=rate, duration=2.0)  # warm-up
        await settle(setup.pids)
        seconds = args.profile_seconds
        pid = line.pids()[0] if args.profile_target == "agent" else setup.pids[0]
        progress(
            f"profiling {args.profile_target} of {SETUPS[setup_key][0]} / {transport}: "
            f"{rate:g} req/s "
            f"open loop + 8 streams at a time, {seconds:g} s"
        )
        spy_proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--nonblocking",  # pausing a process of 100+ threads 200 times a second stalls it
            "--gil",  # only the thread holding the GIL: CPU spent in Python, no idle threads
            "--format",
            "raw",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        cpu_before = cpu_seconds(setup.pids)
        line_cpu_before = cpu_seconds(line.pids())

        async def stream_load() -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                await loadgen.call("streams", targets=streams, n=8, expect=QUICK.chunks)

        load = await asyncio.gather(
            loadgen.call("open_loop", targets=unary, rate=rate, duration=seconds),
            stream_load(),
        )
        cpu = cpu_seconds(setup.pids) - cpu_before
        line_cpu = cpu_seconds(line.pids()) - line_cpu_before
        _, err = await spy_proc.communicate()
        if spy_proc.returncode != 0 or not out.exists():
            print(f"py-spy failed: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)
            return 1
        result = load[0]
        print(
            f"load: {result['ok']} ok / {result['failed']} failed unary at {rate:g}/s; "
            f"broker CPU {cpu:.1f} s over {seconds:g} s "
            f"({100 * cpu / seconds / max(1, setup.n):.0f}% of a core per process); "
            f"{line.name} publisher CPU {line_cpu:.1f} s "
            f"({100 * line_cpu / seconds:.0f}% of a core)"
        )
        print(summarize(out.read_text()))
        print(f"raw stacks: {out}")
    finally:
        await line.stop()
        await loadgen.close()
        await asyncio.to_thread(setup.broker.stop)
        upstream.kill()
        await upstream.wait()
    return 0

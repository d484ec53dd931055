"""``python -m bench.run --soak`` (``make soak``): does the broker stay the same size under
sustained work, and leave nothing behind?

For each setup and transport, with the bench publisher: ``--soak-rounds`` rounds of
``--soak-round-seconds`` each. A round sends non-streaming requests open loop at
``--soak-rate`` to the workers in turn. It also opens 16 streams that run to ``[DONE]`` and 16
that the client leaves after 2 chunks (each must reach the publisher as a ``cancel``), spread
over the round. After each round, once the workers are idle, it reads the RSS, open file
descriptors and threads of every worker, and on Redis the open-task keys left.

The rows judge:
- no request or stream failed, in any round;
- every abandoned stream was cancelled at the publisher;
- no open-task key is left in Redis;
- thread counts are flat (the last round against the first);
- RSS growth over the second half of the rounds, per request served in it, is at most
  128 bytes on every worker, leaving out the round that grew most. The first half is the
  warm-up: caches, pools, lazy imports, and the high-water marks of connections and
  buffers, which rise once when the load meets a busy moment of the machine (8.8 MiB from
  round 1 to 2 in a run that shared the machine with the test suite, flat for the 8 rounds
  after). The heap also grows in steps (1.8 MiB in one round of the second half, flat
  around it: 88 bytes per request over that half): leaving out the largest round ignores
  one such step, while a leak, which grows every round, still shows at its full rate. A
  leak of one small object per request (a dict entry keyed by a task id, and its value) is
  a few hundred bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .lines import BenchLine
from .measure import ProcSample, proc_sample, settle
from .report import at_most, judge, markdown, summary
from .rpc import Child
from .scenarios import QUICK, Bench, Setup, progress

STREAMS_PER_ROUND = 16  # of each kind: run to [DONE], and left after LEAVE_AFTER chunks
LEAVE_AFTER = 2
STREAM_CHUNKS = 32
STREAM_INTERVAL_MS = 20  # so a stream lasts ~0.64 s and is still running when its client leaves
GROWTH_LIMIT_B = 128.0


@dataclass
class Sample:
    rss_kib: list[int]
    fds: list[int]
    threads: list[int]
    task_keys: int | None


@dataclass
class Totals:
    requests: list[int] = field(default_factory=list)  # per round
    all_requests: int = 0
    failed: int = 0
    left: int = 0
    errors: list[str] = field(default_factory=list)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_task_keys(setup: Setup) -> int | None:
    """Open-task keys (``<prefix>:t:*``) in Redis; None for the embedded broker."""
    if not setup.broker.services:
        return None
    import redis

    client = redis.Redis.from_url(setup.broker.env["REDIS_URL"])
    try:
        prefix = setup.broker.env["MCPD_REDIS_PREFIX"]
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:t:*", count=1000))
    finally:
        client.close()


def sample(setup: Setup) -> Sample:
    procs: list[ProcSample] = [proc_sample(pid) for pid in setup.pids]
    return Sample(
        rss_kib=[p.rss_kib for p in procs],
        fds=[open_fds(pid) for pid in setup.pids],
        threads=[p.threads for p in procs],
        task_keys=open_task_keys(setup),
    )


async def soak_one(
    bench: Bench, setup: Setup, transport: str, args: argparse.Namespace, log_dir: Path
) -> None:
    line = BenchLine(log_dir)
    llm = f"soak-{setup.key}-{transport}"
    await bench.start_line(line, setup, transport, llm)
    rate, seconds = args.soak_rate, args.soak_round_seconds
    unary = bench.relayed(setup, llm)
    streamed = bench.relayed(
        setup, llm, stream=True, interval_ms=STREAM_INTERVAL_MS, chunks=STREAM_CHUNKS
    )
    samples: list[Sample] = []
    totals = Totals()
    try:
        for r in range(args.soak_rounds):
            ramp = 0.8 * seconds
            unary_r, full_r, left_r = await asyncio.gather(
                bench.loadgen.call(
                    "open_loop", targets=unary, rate=rate, duration=seconds, timeout=30.0
                ),
                bench.loadgen.call(
                    "streams",
                    targets=streamed,
                    n=STREAMS_PER_ROUND,
                    ramp_s=ramp,
                    expect=STREAM_CHUNKS,
                ),
                bench.loadgen.call(
                    "streams",
                    targets=streamed,
                    n=STREAMS_PER_ROUND,
                    ramp_s=ramp,
                    leave_after=LEAVE_AFTER,
                ),
            )
            await settle(setup.pids + line.pids(), limit=30.0)
            samples.append(sample(setup))
            failed = unary_r["failed"] + full_r["failed"] + left_r["failed"]
            progress(
                f"  round {r + 1}/{args.soak_rounds}: {unary_r['ok']} requests ok, "
                f"{full_r['ok']}+{left_r['ok']} streams ok (full+left), {failed} failed; "
                f"RSS MiB {[round(k / 1024, 1) for k in samples[-1].rss_kib]}, "
                f"fds {samples[-1].fds}, open-task keys {samples[-1].task_keys}"
            )
            totals.failed += failed
            totals.requests.append(unary_r["sent"] + 2 * STREAMS_PER_ROUND)
            totals.all_requests += totals.requests[-1]
            totals.left += left_r["ok"]
            totals.errors += unary_r["errors"] + full_r["errors"] + left_r["errors"]
        cancels = (await line.call("stats"))["counts"].get("frame_cancel", 0)
    finally:
        await line.stop()
    rows(bench, setup, transport, samples, totals, cancels)


def rows(
    bench: Bench,
    setup: Setup,
    transport: str,
    samples: list[Sample],
    totals: Totals,
    cancels: int,
) -> None:
    first, last = samples[0], samples[-1]
    start = half(len(samples))

    row = bench.row(setup, transport, "bench", f"soak: failed, {len(samples)} rounds", "")
    row.relayed = float(totals.failed)
    row.note = f"{totals.all_requests} requests and streams" + (
        f"; {totals.errors[:2]}" if totals.errors else ""
    )
    judge(row, "0", at_most(0.0, "relayed"))

    row = bench.row(setup, transport, "bench", "soak: abandoned streams cancelled", "")
    row.relayed = float(cancels)
    row.note = f"{totals.left} streams left by their client after {LEAVE_AFTER} chunks; "
    row.note += "cancel frames the publisher received"
    judge(row, "= streams left", lambda r: cancels == totals.left)

    if last.task_keys is not None:
        row = bench.row(setup, transport, "bench", "soak: open-task keys left in Redis", "")
        row.relayed = float(last.task_keys)
        row.note = f"after each round: {[s.task_keys for s in samples]}"
        judge(row, "0", at_most(0.0, "relayed"))

    row = bench.row(setup, transport, "bench", "soak: threads per worker", "")
    row.relayed = float(max(last.threads))
    row.note = f"after round 1: {first.threads}; after the last: {last.threads}"
    flat = all(b <= a for a, b in zip(first.threads, last.threads, strict=True))
    judge(row, "flat", lambda _r: flat)

    growth = [
        growth_per_request([s.rss_kib[i] for s in samples], totals.requests, start)
        for i in range(len(first.rss_kib))
    ]
    row = bench.row(
        setup, transport, "bench", "soak: RSS growth per request, 2nd half, max worker", "B"
    )
    row.relayed = max(growth)
    row.note = (
        "RSS MiB after each round, per worker: "
        + "; ".join(
            f"w{i} " + " ".join(f"{s.rss_kib[i] / 1024:.1f}" for s in samples)
            for i in range(len(first.rss_kib))
        )
        + f"; fds after round 1 {first.fds}, after the last {last.fds}; "
        f"{sum(totals.requests[start:])} requests over the last {len(samples) - start} rounds, "
        "the round that grew most left out"
    )
    judge(row, f"≤ {GROWTH_LIMIT_B:.0f} B", at_most(GROWTH_LIMIT_B, "relayed"))


def growth_per_request(rss_kib: list[int], requests: list[int], start: int) -> float:
    """Bytes of RSS growth per request served over the rounds from ``start`` (0-based) on,
    leaving out the round that grew most (one step of the heap; a leak grows every round)."""
    rounds = [(rss_kib[i] - rss_kib[i - 1], requests[i]) for i in range(start, len(rss_kib))]
    if len(rounds) >= 2:
        rounds.remove(max(rounds))
    served = sum(n for _, n in rounds)
    return sum(kib for kib, _ in rounds) * 1024 / max(served, 1)


def half(rounds: int) -> int:
    """Rounds in the first half (the warm-up); at least one."""
    return max(1, rounds // 2)


async def run_soak(args: argparse.Namespace) -> int:
    from .run import SETUPS, services_up, start_setup, start_upstream

    log_dir = Path(tempfile.mkdtemp(prefix="mcpd-soak-"))
    setups = [s for s in args.setups.split(",") if s]
    notes: list[str] = []
    if "services" in setups:
        up, why = services_up()
        if not up:
            notes.append(f"3-process setup skipped: {why}")
            setups.remove("services")
    upstream, upstream_url = await start_upstream(log_dir)
    loadgen = await Child.spawn("loadgen", "bench.loadgen", log_dir)
    bench = Bench(QUICK, loadgen, upstream_url, log_dir)
    progress(
        f"soak: {args.soak_rounds} rounds of {args.soak_round_seconds:g} s at "
        f"{args.soak_rate:g} req/s plus {2 * STREAMS_PER_ROUND} streams per round; "
        f"logs in {log_dir}"
    )
    try:
        for key in setups:
            progress(f"starting {SETUPS[key][0]}")
            setup = await start_setup(key)
            try:
                for transport in args.transports.split(","):
                    progress(f"{key} / {transport}: soak")
                    try:
                        await soak_one(bench, setup, transport, args, log_dir)
                    except Exception as exc:
                        what = f"{type(exc).__name__}: {exc}"[:300]
                        notes.append(f"{key}/{transport}: soak did not complete: {what}")
                        row = bench.row(setup, transport, "bench", "soak: did not complete", "")
                        row.goal, row.verdict, row.note = "completes", "FAIL", what
            finally:
                await asyncio.to_thread(setup.broker.stop)
    finally:
        await loadgen.close()
        upstream.kill()
        await upstream.wait()
    print()
    print(markdown(bench.rows))
    print()
    for note in notes:
        print(f"note: {note}")
    print(summary(bench.rows))
    print(f"logs: {log_dir}")
    return 1 if any(r.verdict == "FAIL" for r in bench.rows) else 0

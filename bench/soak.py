"""``python -m bench.run --soak`` (``make soak``): does the broker stay the same size under
sustained work, and leave nothing behind?

For each setup and transport, with the bench publisher: ``--soak-rounds`` rounds of
``--soak-round-seconds`` each. A round sends non-streaming requests open loop at
``--soak-rate`` to the workers in turn. It also opens 16 streams that run to ``[DONE]`` and 16
that the client leaves after 2 chunks (each must reach the publisher as a ``cancel``), spread
over the round. After each round, once the workers are idle, it reads the RSS, open file
descriptors and threads of every worker, and on Redis the open-task keys left.

On the 3-process setup two rounds also carry a fault (bench/soak_faults.py), with the load
running through it: round 2 a SIGTERM rolling restart of every worker (each drained, started
again and ready before the next), round 3 a restart of the broker's Redis (a redis-server of
the soak's own). Their clients' outcomes are reported per outcome.

The rows judge:
- no request or stream failed, in any round without a fault;
- in a fault's round every failure was an explicit refusal (502/503/504 with a code, or a
  stream's error event), none a 500, a cut connection, a timeout or a silent stream; and
  every worker relayed again soon after;
- the LLM's row is active at the end, with nothing in flight (no stuck row);
- every abandoned stream was cancelled at the publisher;
- no open-task key is left in Redis;
- thread counts are flat (the last round against the first of each worker's last life);
- RSS growth over the second half of the rounds, per request served in it, is at most
  128 bytes on every worker, leaving out the round that grew most. A restarted worker is a
  new process whose RSS starts again: growth is judged per worker *life* (the rounds
  sampled from one pid), each on the second half of its own rounds, and a life of fewer
  than MIN_LIFE samples (a restart near the end) is shown, not judged. The first half is the
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
from typing import Any

from tests.faults import PrivateRedis, ServiceMissing

from .lines import BenchLine
from .measure import ProcSample, proc_sample, settle
from .report import at_most, judge, markdown, summary
from .rpc import Child
from .scenarios import QUICK, Bench, Setup, progress
from .soak_faults import FAULT_ROUNDS, FaultReport, merge_outcomes, row_state, run_fault

STREAMS_PER_ROUND = 16  # of each kind: run to [DONE], and left after LEAVE_AFTER chunks
# Each round without a fault also sends bursts of big requests, BIG_BURST at once (issue
# 29 item 1: such bursts lost tasks when they rode Redis pub/sub), all of which must be
# answered: WARM_BURSTS one after another in the warm-up half, one in each round after.
# Their buffers (the Redis clients' read buffers, the sockets') rise to a high-water mark
# over about a dozen bursts and stay there (8 x 4 MiB, 25 bursts on three workers: the
# stream holder 155 -> 199 MiB by the 12th, flat for the 13 after), which the warm-up
# half is for.
BIG_BURST = 8
BIG_BODY_BYTES = 4 * 1024 * 1024
WARM_BURSTS = 6
LEAVE_AFTER = 2
STREAM_CHUNKS = 32
STREAM_INTERVAL_MS = 20  # so a stream lasts ~0.64 s and is still running when its client leaves
GROWTH_LIMIT_B = 128.0
MIN_LIFE = 4  # samples of one worker process before its growth is judged


@dataclass
class Sample:
    pids: list[int]
    rss_kib: list[int]
    fds: list[int]
    threads: list[int]
    task_keys: int | None
    blob_keys: int | None  # big messages' blobs (spill.py) nobody took


@dataclass
class Totals:
    requests: list[int] = field(default_factory=list)  # per round
    all_requests: int = 0
    failed: int = 0
    left: int = 0
    errors: list[str] = field(default_factory=list)
    faults: list[FaultReport] = field(default_factory=list)
    # Streams left by their client, and cancel frames the publisher got, in the rounds
    # without a fault (in a fault's round a task that timed out is cancelled too).
    left_clean: int = 0
    cancels_clean: int = 0
    big_sent: int = 0  # big requests, in bursts (BIG_BURST)
    big_failed: int = 0
    row: dict[str, object] = field(default_factory=dict)  # the LLM's row at the end


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_keys(setup: Setup, kind: str) -> int | None:
    """Keys ``<prefix>:<kind>:*`` in Redis (``t``: open tasks, ``spill``: big messages'
    blobs); None for the embedded broker."""
    if not setup.broker.services:
        return None
    import redis

    client = redis.Redis.from_url(setup.broker.env["REDIS_URL"])
    try:
        prefix = setup.broker.env["MCPD_REDIS_PREFIX"]
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:{kind}:*", count=1000))
    finally:
        client.close()


def sample(setup: Setup) -> Sample:
    procs: list[ProcSample] = [proc_sample(pid) for pid in setup.pids]
    return Sample(
        pids=list(setup.pids),
        rss_kib=[p.rss_kib for p in procs],
        fds=[open_fds(pid) for pid in setup.pids],
        threads=[p.threads for p in procs],
        task_keys=redis_keys(setup, "t"),
        blob_keys=redis_keys(setup, "spill"),
    )


async def soak_one(
    bench: Bench,
    setup: Setup,
    transport: str,
    args: argparse.Namespace,
    log_dir: Path,
    redis: PrivateRedis | None = None,
) -> None:
    line = BenchLine(log_dir)
    llm = f"soak-{setup.key}-{transport}"
    await bench.start_line(line, setup, transport, llm)
    rate, seconds = args.soak_rate, args.soak_round_seconds
    unary = bench.relayed(setup, llm)
    streamed = bench.relayed(
        setup, llm, stream=True, interval_ms=STREAM_INTERVAL_MS, chunks=STREAM_CHUNKS
    )
    big_body = {"model": llm, "messages": [{"role": "user", "content": "b" * BIG_BODY_BYTES}]}
    big = bench.relayed(setup, llm, body=big_body)
    samples: list[Sample] = []
    totals = Totals()
    cancels_seen = 0

    async def out(urls: list[str]) -> None:
        await asyncio.gather(
            bench.loadgen.call("set_out", urls=urls), line.call("set_out", urls=urls)
        )

    try:
        for r in range(args.soak_rounds):
            ramp = 0.8 * seconds
            fault = FAULT_ROUNDS.get(r) if redis is not None else None
            faulting = (
                asyncio.create_task(run_fault(fault, setup, llm, seconds, redis, out))
                if fault
                else None
            )
            # Bursts of big requests (none in a fault's round: it is judged on its own
            # outcomes).
            count = 0 if fault else WARM_BURSTS if r < half(args.soak_rounds) else 1
            burst = big_bursts(bench, big, count, seconds)
            unary_r, full_r, left_r, big_r = await asyncio.gather(
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
                burst,
            )
            totals.big_sent += big_r["n"]
            totals.big_failed += big_r["failed"]
            totals.errors += big_r["errors"]
            try:
                report = await faulting if faulting is not None else None
            except Exception:
                progress(f"  the fault failed; the publisher's stats: {await line.call('stats')}")
                for i in range(setup.n):  # the broker's logs go with it: keep them
                    (log_dir / f"worker{i}.log").write_text(setup.broker.log(i, None))
                raise
            await settle(setup.pids + line.pids(), limit=30.0)
            samples.append(sample(setup))
            failed = unary_r["failed"] + full_r["failed"] + left_r["failed"]
            sent = unary_r["sent"] + 2 * STREAMS_PER_ROUND
            outcomes = merge_outcomes([unary_r, full_r, left_r])
            progress(
                f"  round {r + 1}/{args.soak_rounds}{f' ({fault})' if fault else ''}: "
                f"{unary_r['ok']} requests ok, {full_r['ok']}+{left_r['ok']} streams ok "
                f"(full+left), {failed} failed {outcomes or ''}; "
                f"RSS MiB {[round(k / 1024, 1) for k in samples[-1].rss_kib]}, "
                f"fds {samples[-1].fds}, open-task keys {samples[-1].task_keys}"
            )
            if report is not None:
                report.outcomes, report.requests = outcomes, sent
                report.outcomes["answered"] = sent - failed
                totals.faults.append(report)
            else:
                totals.failed += failed
                totals.errors += unary_r["errors"] + full_r["errors"] + left_r["errors"]
            totals.requests.append(sent)
            totals.all_requests += sent
            totals.left += left_r["ok"]
            cancels_now = (await line.call("stats"))["counts"].get("frame_cancel", 0)
            if report is None:
                totals.left_clean += left_r["ok"]
                totals.cancels_clean += cancels_now - cancels_seen
            cancels_seen = cancels_now
        stats = await line.call("stats")
        cancels = stats["counts"].get("frame_cancel", 0)
        if stats["errors"]:
            totals.errors += [f"publisher: {e}" for e in stats["errors"]]
        totals.row = await row_state(setup, llm)
    finally:
        await line.stop()
    rows(bench, setup, transport, samples, totals, cancels)


async def big_bursts(
    bench: Bench, targets: list[dict[str, object]], count: int, seconds: float
) -> dict[str, Any]:
    """``count`` bursts of BIG_BURST big requests at once, spread over the round."""
    total: dict[str, Any] = {"n": 0, "failed": 0, "errors": []}
    for _ in range(count):
        await asyncio.sleep(seconds / (count + 1))
        result = await bench.loadgen.call("burst", targets=targets, n=BIG_BURST)
        total["n"] += result["n"]
        total["failed"] += result["failed"]
        total["errors"] += result["errors"]
    return total


def rows(
    bench: Bench,
    setup: Setup,
    transport: str,
    samples: list[Sample],
    totals: Totals,
    cancels: int,
) -> None:
    first, last = samples[0], samples[-1]

    row = bench.row(setup, transport, "bench", f"soak: failed, {len(samples)} rounds", "")
    row.relayed = float(totals.failed)
    clean = len(samples) - len(totals.faults)
    row.note = f"{totals.all_requests} requests and streams; {clean} rounds without a fault" + (
        f"; {totals.errors[:2]}" if totals.errors else ""
    )
    judge(row, "0", at_most(0.0, "relayed"))

    for fault in totals.faults:
        row = bench.row(setup, transport, "bench", f"soak: {fault.name}, not explicit", "")
        unexplained = fault.unexplained()
        row.relayed = float(sum(unexplained.values()))
        row.note = (
            f"of {fault.requests}: {fault.outcomes}; every worker relaying "
            f"{fault.back_after_s:.2f} s after it; {fault.note}"
        )
        judge(row, "0", at_most(0.0, "relayed"))

    if totals.row:
        end_state = totals.row
        row = bench.row(setup, transport, "bench", "soak: row at the end", "")
        row.relayed = float(str(end_state["inFlight"]))
        row.note = f"status {end_state['status']}, {end_state['inFlight']} in flight"
        judge(
            row,
            "active, 0 in flight",
            lambda r: end_state["status"] == "active" and r.relayed == 0,
        )

    row = bench.row(setup, transport, "bench", "soak: abandoned streams cancelled", "")
    row.relayed = float(totals.cancels_clean)
    row.note = (
        f"{totals.left_clean} streams left by their client after {LEAVE_AFTER} chunks in the "
        f"rounds without a fault; cancel frames the publisher received in them (all rounds: "
        f"{totals.left} left, {cancels} cancels)"
    )
    judge(row, "= streams left", lambda r: totals.cancels_clean == totals.left_clean)

    if last.task_keys is not None:
        row = bench.row(setup, transport, "bench", "soak: open-task keys left in Redis", "")
        row.relayed = float(last.task_keys)
        row.note = f"after each round: {[s.task_keys for s in samples]}"
        judge(row, "0", at_most(0.0, "relayed"))

    row = bench.row(setup, transport, "bench", "soak: big requests failed", "")
    row.relayed = float(totals.big_failed)
    row.note = (
        f"{totals.big_sent} requests of {BIG_BODY_BYTES // 1024 // 1024} MiB, "
        f"{BIG_BURST} at once, in the rounds without a fault"
    )
    if last.blob_keys is not None:
        row.note += "; big messages' blobs left in Redis after each round: "
        row.note += f"{[s.blob_keys for s in samples]}"
    left = last.blob_keys or 0
    judge(row, "0, no blob left", lambda r: totals.big_failed == 0 and left == 0)

    workers = range(len(first.rss_kib))
    lives = [worker_lives(samples, i) for i in workers]
    row = bench.row(setup, transport, "bench", "soak: threads per worker", "")
    row.relayed = float(max(last.threads))
    # The last round against the first; for a worker restarted meanwhile, against the middle
    # of its last life (as for RSS: a fresh process starts its pools' threads as it meets
    # its first loads and faults).
    marks = [
        samples[life[0] if life[0] == 0 else life[half(len(life)) - 1]].threads[i]
        for i, life in ((i, lives[i][-1]) for i in workers)
    ]
    row.note = f"first (or mid-life, if restarted): {marks}; after the last: {last.threads}"
    flat = all(b <= a for a, b in zip(marks, last.threads, strict=True))
    judge(row, "flat", lambda _r: flat)

    growth: list[float] = []
    shown: list[str] = []
    for i in workers:
        for n, life in enumerate(lives[i]):
            rss = [samples[k].rss_kib[i] for k in life]
            served = [totals.requests[k] for k in life]
            tag = f"w{i}" + (f" life {n + 1}" if len(lives[i]) > 1 else "")
            if len(life) >= MIN_LIFE:
                growth.append(growth_per_request(rss, served, half(len(life))))
            else:
                tag += " (not judged: short)"
            shown.append(f"{tag} " + " ".join(f"{k / 1024:.1f}" for k in rss))
    row = bench.row(
        setup, transport, "bench", "soak: RSS growth per request, 2nd half, max worker", "B"
    )
    row.relayed = max(growth) if growth else float("nan")
    row.note = (
        "RSS MiB after each round, per worker life: "
        + "; ".join(shown)
        + f"; fds after round 1 {first.fds}, after the last {last.fds}; "
        "each life judged on the second half of its rounds, the round that grew most left out"
    )
    judge(row, f"≤ {GROWTH_LIMIT_B:.0f} B", at_most(GROWTH_LIMIT_B, "relayed"))


def worker_lives(samples: list[Sample], worker: int) -> list[list[int]]:
    """The sample indices of each life of one worker: consecutive samples of one pid."""
    lives: list[list[int]] = []
    for k, s in enumerate(samples):
        if lives and samples[lives[-1][-1]].pids[worker] == s.pids[worker]:
            lives[-1].append(k)
        else:
            lives.append([k])
    return lives


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
    redis: PrivateRedis | None = None
    try:
        for key in setups:
            progress(f"starting {SETUPS[key][0]}")
            env: dict[str, str] = {}
            if key == "services":
                # A task lost with Redis (a frame published as it went) ends in the broker's
                # 504 before the load generator's 30 s timeout or 10 s stall would cut it.
                env["MCPD_INFER_TIMEOUT_SECONDS"] = "8"
                # A Redis of the soak's own, so that a fault round may restart it.
                try:
                    redis = PrivateRedis(log_dir).start()
                    env["REDIS_URL"] = redis.url
                except ServiceMissing as exc:
                    notes.append(f"no fault rounds: {exc}")
                if args.soak_rounds <= max(FAULT_ROUNDS):
                    notes.append(f"no fault rounds: they need more than {max(FAULT_ROUNDS)}")
            setup = await start_setup(key, env)
            try:
                for transport in args.transports.split(","):
                    progress(f"{key} / {transport}: soak")
                    try:
                        await soak_one(bench, setup, transport, args, log_dir, redis)
                    except Exception as exc:
                        what = f"{type(exc).__name__}: {exc}"[:300]
                        notes.append(f"{key}/{transport}: soak did not complete: {what}")
                        row = bench.row(setup, transport, "bench", "soak: did not complete", "")
                        row.goal, row.verdict, row.note = "completes", "FAIL", what
            finally:
                await asyncio.to_thread(setup.broker.stop)
    finally:
        if redis is not None:
            redis.stop()
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

"""What is measured. Each scenario runs the direct baseline and the relayed path side by side
in the same run, repeats its window, and records the median over windows as a :class:`Row`.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.cluster import Broker

from .lines import BenchLine, Line, WakeSpec
from .measure import ProcSample, median, pct, proc_sample, settle
from .report import Row, at_least, at_most, judge
from .rpc import Child
from .upstream import EMBED_INPUTS, EMBEDDINGS


@dataclass(frozen=True)
class Sizes:
    quick: bool
    windows: int  # repeated windows (c=1 latency, streaming)
    pairs: int  # direct/relayed pairs per latency window
    big_pairs: int  # the same with a big answer (embeddings)
    stream_pairs: int  # streaming pairs per window at concurrency 1
    wide: int  # concurrent streams ("256")
    wide_windows: int
    chunks: int  # chunks per stream ("64")
    rate_windows: int  # windows per open-loop rate probe
    rate_window_s: float
    rate_factor: float  # geometric step of the rate search
    rate_refine: int  # bisection steps after the first failing rate
    rate_cap: float
    capacity_steps: tuple[int, ...]
    capacity_interval_ms: int  # gap between a held stream's chunks
    capacity_chunks: int
    idle_sessions: int
    waiting: int
    wake_requests: int
    wake_windows: int
    wake_delay_s: float
    memory_settle_s: float  # extra quiet time before reading RSS
    direct_rate_start: float


FULL = Sizes(
    quick=False,
    windows=5,
    pairs=100,
    big_pairs=20,
    stream_pairs=10,
    wide=256,
    wide_windows=3,
    chunks=64,
    rate_windows=3,
    rate_window_s=1.5,
    rate_factor=1.5,
    rate_refine=2,  # a x1.5 step halved twice: the limit lies within 1.125x the rate found
    rate_cap=4000,
    capacity_steps=(500, 1000, 2000),
    capacity_interval_ms=2000,
    capacity_chunks=4,
    idle_sessions=1000,
    waiting=1000,
    wake_requests=500,
    wake_windows=3,
    wake_delay_s=1.0,
    memory_settle_s=1.0,
    direct_rate_start=400,
)
QUICK = Sizes(
    quick=True,
    windows=3,
    pairs=15,
    big_pairs=5,
    stream_pairs=2,
    wide=16,
    wide_windows=3,
    chunks=32,
    rate_windows=2,
    rate_window_s=0.3,
    rate_factor=2.0,
    rate_refine=0,
    rate_cap=800,
    capacity_steps=(50,),
    capacity_interval_ms=150,
    capacity_chunks=3,
    idle_sessions=50,
    waiting=50,
    wake_requests=30,
    wake_windows=2,
    wake_delay_s=0.2,
    memory_settle_s=0.1,
    direct_rate_start=800,
)

P99_LIMIT_MS = 50.0


@dataclass
class C1:
    """Per-window figures of a concurrency-1 measurement (:meth:`Bench._c1_windows`)."""

    direct_p50: list[float] = field(default_factory=list)
    relayed_p50: list[float] = field(default_factory=list)
    added_p50: list[float] = field(default_factory=list)
    direct_p99: list[float] = field(default_factory=list)
    relayed_p99: list[float] = field(default_factory=list)
    added_p99: list[float] = field(default_factory=list)
    cpu_per_req: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    note: str = ""


PROMPT = [{"role": "user", "content": "Say hello."}]


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    key: str  # "embedded" | "services"
    label: str
    broker: Broker
    client_token: str
    publisher_token: str
    limited_token: str | None = None  # a client token with limits (the "limited" rows)

    @property
    def n(self) -> int:
        return self.broker.n

    @property
    def urls(self) -> list[str]:
        return [self.broker.url(i) for i in range(self.n)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.broker.procs if p is not None]

    @property
    def stream_worker(self) -> int:
        """Where a publisher's stream is held: worker 0, so on the 3-process broker two
        thirds of the requests (round-robin) and result POSTs land elsewhere."""
        return 0


async def start_line(
    line: Line,
    setup: Setup,
    transport: str,
    llm: str,
    upstream: str,
    wake: WakeSpec | None = None,
) -> None:
    """Start a publisher line serving ``llm`` from ``upstream``, its stream on the setup's
    stream worker and its answers to every worker."""
    await line.start(
        workers=setup.urls,
        stream_worker=setup.stream_worker,
        publisher_token=setup.publisher_token,
        client_token=setup.client_token,
        transport=transport,
        llm=llm,
        upstream=upstream,
        wake=wake,
    )


class Bench:
    def __init__(self, sizes: Sizes, loadgen: Child, upstream: str, log_dir: Any) -> None:
        self.sizes = sizes
        self.loadgen = loadgen
        self.upstream = upstream  # http://127.0.0.1:port/v1
        self.log_dir = log_dir
        self.rows: list[Row] = []
        self.direct_rate: float | None = None
        self.direct_rate_note = ""
        self.direct_capacity: int | None = None
        self.c1_p50: dict[tuple[str, str, str], float] = {}
        self.sdk_checked: set[tuple[str, str]] = set()

    # --- targets ---------------------------------------------------------------------------

    def _body(self, model: str, stream: bool, interval_ms: int, chunks: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": chunks}
        if stream:
            body |= {"stream": True, "bench_interval_ms": interval_ms}
        return body

    def direct(
        self, *, stream: bool = False, interval_ms: int = 0, chunks: int = 0
    ) -> dict[str, Any]:
        return {
            "url": f"{self.upstream}/chat/completions",
            "headers": {"Authorization": "Bearer direct"},
            "body": self._body("bench-upstream", stream, interval_ms, chunks or self.sizes.chunks),
        }

    def relayed(
        self,
        setup: Setup,
        llm: str,
        *,
        stream: bool = False,
        interval_ms: int = 0,
        chunks: int = 0,
        workers: list[int] | None = None,
        endpoint: str = "/v1/chat/completions",
        body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> list[dict[str, Any]]:
        if body is None:
            body = self._body(llm, stream, interval_ms, chunks or self.sizes.chunks)
        headers = {"Authorization": f"Bearer {token or setup.client_token}"}
        return [
            {"url": f"{setup.broker.url(i)}{endpoint}", "headers": headers, "body": body}
            for i in (workers if workers is not None else range(setup.n))
        ]

    async def start_line(
        self, line: Line, setup: Setup, transport: str, llm: str, wake: WakeSpec | None = None
    ) -> None:
        """:func:`start_line` from this bench's upstream."""
        await start_line(line, setup, transport, llm, self.upstream, wake)

    def row(self, setup: Setup, transport: str, line: str, metric: str, unit: str) -> Row:
        row = Row(setup.label, transport, line, metric, unit)
        self.rows.append(row)
        return row

    # --- added latency at concurrency 1 ------------------------------------------------------

    async def _c1_windows(
        self, setup: Setup, direct: dict[str, Any], relayed: list[dict[str, Any]], pairs: int
    ) -> C1:
        """``windows`` windows of ``pairs`` direct/relayed pairs at concurrency 1, after a
        short warm-up (connections, caches, the hub); per window the p50s, p99s and the
        broker CPU per relayed request."""
        out = C1()
        await self.loadgen.call("pairs", direct=direct, relayed=relayed, n=min(20, pairs))
        for _ in range(self.sizes.windows):
            before = sum(proc_sample(pid).cpu_s for pid in setup.pids)
            r = await self.loadgen.call("pairs", direct=direct, relayed=relayed, n=pairs)
            spent = sum(proc_sample(pid).cpu_s for pid in setup.pids) - before
            out.failed += r["failed_direct"] + r["failed_relayed"]
            out.errors += r["errors"]
            for q, direct_q, relayed_q, added_q in (
                (50, out.direct_p50, out.relayed_p50, out.added_p50),
                (99, out.direct_p99, out.relayed_p99, out.added_p99),
            ):
                d, rel = pct(r["direct"], q), pct(r["relayed"], q)
                direct_q.append(d)
                relayed_q.append(rel)
                added_q.append(rel - d)
            out.cpu_per_req.append(spent * 1000 / max(1, len(r["relayed"])))
        out.note = f"{self.sizes.windows} windows x {pairs} pairs"
        if out.failed:
            out.note += f"; {out.failed} failed: {out.errors[:2]}"
        return out

    def _c1_row(self, setup: Setup, transport: str, line: str, metric: str, c1: C1, q: int) -> Row:
        """The p``q`` (50 or 99) row of a concurrency-1 measurement."""
        direct, relayed, added = (
            (c1.direct_p50, c1.relayed_p50, c1.added_p50)
            if q == 50
            else (c1.direct_p99, c1.relayed_p99, c1.added_p99)
        )
        row = self.row(setup, transport, line, metric, "ms")
        row.direct, row.relayed, row.added = median(direct), median(relayed), median(added)
        row.windows, row.note = added, c1.note
        return row

    def _cpu_row(self, setup: Setup, transport: str, line: str, metric: str, c1: C1) -> None:
        row = self.row(setup, transport, line, metric, "ms")
        row.relayed = median(c1.cpu_per_req)
        row.windows = c1.cpu_per_req
        row.note = f"user+sys of {setup.n} daphne process(es) / requests"

    async def latency(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        c1 = await self._c1_windows(
            setup, self.direct(), self.relayed(setup, llm), self.sizes.pairs
        )
        self.c1_p50[(setup.key, transport, line.name)] = median(c1.relayed_p50)
        goal50 = 3.0 if transport == "ws" else 5.0
        row = self._c1_row(setup, transport, line.name, "added latency p50, c=1", c1, 50)
        judge(row, f"≤ {goal50:g} ms", lambda r: at_most(goal50)(r) and c1.failed == 0)
        row = self._c1_row(setup, transport, line.name, "added latency p99, c=1", c1, 99)
        judge(row, "≤ 15 ms", lambda r: at_most(15.0)(r) and c1.failed == 0)
        self._cpu_row(setup, transport, line.name, "broker CPU per relayed request, c=1", c1)

    async def limited(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        """The c=1 rows again for a client token with every limit set (issue 24), none of
        them reached: its admission's round trip and the end's, beside the unlimited rows
        of ``latency``."""
        if setup.limited_token is None:
            out = await asyncio.to_thread(
                setup.broker.manage,
                "createtoken",
                "client",
                f"bench-limited-{uuid.uuid4().hex[:6]}",
                "--rpm",
                "1000000",
                "--tpm",
                "1000000000",
                "--max-concurrency",
                "10000",
            )
            setup.limited_token = out.stdout.strip().splitlines()[-1]
        c1 = await self._c1_windows(
            setup,
            self.direct(),
            self.relayed(setup, llm, token=setup.limited_token),
            self.sizes.pairs,
        )
        name = line.name
        self._c1_row(setup, transport, name, "added latency p50, c=1, limited token", c1, 50)
        self._c1_row(setup, transport, name, "added latency p99, c=1, limited token", c1, 99)
        self._cpu_row(
            setup, transport, name, "broker CPU per relayed request, c=1, limited token", c1
        )

    async def big(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        """A big answer at concurrency 1: ``/v1/embeddings`` answering 16 x 1,536 floats
        (about 500 KB of JSON), where decoding and encoding the answer at each step costs
        more than everything else. Not a goal of the issue; printed so that the cost shows."""
        size = len(EMBEDDINGS)
        body = {"input": [f"passage {i}" for i in range(EMBED_INPUTS)]}
        direct = {
            "url": f"{self.upstream}/embeddings",
            "headers": {"Authorization": "Bearer direct"},
            "body": {**body, "model": "bench-upstream"},
            "min_bytes": size,
        }
        # The broker may write the same JSON more compactly, never much shorter.
        relayed = [
            {**target, "min_bytes": size * 9 // 10}
            for target in self.relayed(
                setup, llm, endpoint="/v1/embeddings", body={**body, "model": llm}
            )
        ]
        c1 = await self._c1_windows(setup, direct, relayed, self.sizes.big_pairs)
        kib = size / 1024
        metric = f"added latency p50, c=1, {kib:.0f} KiB embeddings answer"
        self._c1_row(setup, transport, line.name, metric, c1, 50)
        metric = f"broker CPU per relayed {kib:.0f} KiB answer, c=1"
        self._cpu_row(setup, transport, line.name, metric, c1)

    # --- throughput: open-loop arrival rate ----------------------------------------------------

    async def _probe(
        self, targets: list[dict[str, Any]], rate: float, pids: list[int]
    ) -> tuple[bool, str]:
        s = self.sizes
        p99s: list[float] = []
        failed = late = 0
        offered = math.inf
        errors: list[str] = []
        for _ in range(s.rate_windows):
            r = await self.loadgen.call(
                "open_loop", targets=targets, rate=rate, duration=s.rate_window_s, timeout=10.0
            )
            p99s.append(pct(r["lat"], 99) if r["lat"] else math.inf)
            failed += r["failed"]
            late += r["late"]
            offered = min(offered, r["offered"])
            errors += r["errors"]
            if failed or p99s[-1] > 10 * P99_LIMIT_MS:
                break  # clearly over; the remaining windows cannot save it
        # Every answer is in (open_loop waits for them); let the stragglers' cleanup finish.
        await settle(pids, limit=5.0)
        p99 = median(p99s)
        # A rate counts only if it was offered: the generator kept up with its schedule.
        kept_up = offered >= 0.95 * rate
        ok = failed == 0 and len(p99s) == s.rate_windows and p99 < P99_LIMIT_MS and kept_up
        detail = f"{rate:.0f}/s: p99 {p99:.1f} ms, {failed} failed, {late} sent >5 ms late"
        if not kept_up:
            detail += f", generator offered only {offered:.0f}/s"
        if errors:
            detail += f" ({errors[0]})"
        return ok, detail

    async def max_rate(
        self,
        targets: list[dict[str, Any]],
        start: float,
        pids: list[int],
        factor: float | None = None,
    ) -> tuple[float, str]:
        """The highest arrival rate passing :meth:`_probe`: geometric steps up from
        ``start`` (down by halves if it fails), then bisection."""
        s = self.sizes
        good, bad = 0.0, math.inf
        last_fail = ""
        rate = max(5.0, start)
        while rate <= s.rate_cap:
            ok, detail = await self._probe(targets, rate, pids)
            progress(f"  rate {detail} → {'ok' if ok else 'over'}")
            if ok:
                good = rate
                if bad < math.inf or rate >= s.rate_cap:
                    break
                # A step past the cap tries the cap itself, so "no limit up to the cap" is
                # only said of the cap.
                rate = min(round(rate * (factor or s.rate_factor)), s.rate_cap)
            else:
                bad, last_fail = rate, detail
                if good:
                    break
                rate = round(rate / 2)
                if rate < 5:
                    break
        for _ in range(s.rate_refine):
            if not good or bad == math.inf or bad - good <= max(5.0, good * 0.05):
                break
            mid = round((good + bad) / 2)
            ok, detail = await self._probe(targets, mid, pids)
            progress(f"  rate {detail} → {'ok' if ok else 'over'}")
            if ok:
                good = mid
            else:
                bad, last_fail = mid, detail
        if last_fail:
            note = f"first over: {last_fail}"
        elif good >= s.rate_cap:
            note = f"no limit up to {s.rate_cap:g}/s (the search's cap)"
        else:
            note = f"no rate passed from {start:g}/s"
        return good, note

    async def direct_baseline_rate(self) -> None:
        progress("direct baseline: max open-loop rate of the upstream alone")
        self.direct_rate, self.direct_rate_note = await self.max_rate(
            [self.direct()], self.sizes.direct_rate_start, [], factor=2.0
        )

    async def throughput(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        p50 = self.c1_p50.get((setup.key, transport, line.name), 10.0)
        start = max(10.0, 0.5 * 1000 / max(p50, 0.5))
        targets = self.relayed(setup, llm)
        rate, note = await self.max_rate(targets, start, setup.pids + line.pids())
        row = self.row(setup, transport, line.name, "max rate, p99 < 50 ms, 0 failed", "req/s")
        row.direct, row.relayed, row.note = self.direct_rate, rate, note
        if setup.n >= 3:
            judge(row, "≥ 600 req/s (3 procs)", at_least(600.0))

    # --- streaming -----------------------------------------------------------------------------

    async def streaming(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        s = self.sizes
        ttft1: list[tuple[float, float]] = []
        cps1: list[tuple[float, float]] = []
        failed1 = 0
        direct_s, relayed_s = self.direct(stream=True), self.relayed(setup, llm, stream=True)
        await self.loadgen.call(
            "pairs", direct=direct_s, relayed=relayed_s, n=2, stream=True, expect=s.chunks
        )
        for _ in range(s.windows):
            r = await self.loadgen.call(
                "pairs",
                direct=direct_s,
                relayed=relayed_s,
                n=s.stream_pairs,
                stream=True,
                expect=s.chunks,
            )
            failed1 += r["failed_direct"] + r["failed_relayed"]
            ttft1.append((median(r["direct"]), median(r["relayed"])))
            d_rate = r["direct_chunks"] / max(1e-9, sum(r["direct_total"]) / 1000)
            r_rate = r["relayed_chunks"] / max(1e-9, sum(r["relayed_total"]) / 1000) / setup.n
            cps1.append((d_rate, r_rate))
        self._pair_row(setup, transport, line, "added TTFT, 1 stream", "ms", ttft1, failed1)
        row = self._pair_row(
            setup, transport, line, "chunks/s per process, 1 stream", "chunk/s", cps1, failed1
        )
        row.added = None

        ttft: list[tuple[float, float]] = []
        cps: list[tuple[float, float]] = []
        failed = stalled = chunks = frames = 0
        errors: list[str] = []
        for w in range(s.wide_windows):
            order = ("direct", "relayed") if w % 2 == 0 else ("relayed", "direct")
            got: dict[str, dict[str, Any]] = {}
            for side in order:
                targets = [direct_s] if side == "direct" else relayed_s
                got[side] = await self.loadgen.call(
                    "streams", targets=targets, n=s.wide, stall_s=10.0, expect=s.chunks
                )
                await settle(setup.pids, limit=5.0)
            d, r = got["direct"], got["relayed"]
            failed += d["failed"] + r["failed"]
            stalled += r["stalled"]
            errors += d["errors"] + r["errors"]
            chunks += r["chunks"]
            frames += r["frames"]
            ttft.append((median(d["ttft"]), median(r["ttft"])))
            cps.append((d["chunks"] / d["wall"], r["chunks"] / r["wall"] / setup.n))
        self._pair_row(setup, transport, line, f"added TTFT, {s.wide} streams", "ms", ttft, failed)
        row = self._pair_row(
            setup,
            transport,
            line,
            f"chunks/s per process, {s.wide} streams",
            "chunk/s",
            cps,
            failed,
        )
        row.added = None
        row.note += f"; {chunks / max(frames, 1):.1f} chunks per relayed frame"
        if stalled or errors:
            row.note += f"; {stalled} stalled; {errors[:2]}"
        judge(
            row,
            "≥ 5,000 at 256, none stalled",
            lambda r: at_least(5000.0)(r) and not failed + stalled,
            applies=s.wide >= 256,
        )

    def _pair_row(
        self,
        setup: Setup,
        transport: str,
        line: Line,
        metric: str,
        unit: str,
        windows: list[tuple[float, float]],
        failed: int,
    ) -> Row:
        row = self.row(setup, transport, line.name, metric, unit)
        row.direct = median([d for d, _ in windows])
        row.relayed = median([r for _, r in windows])
        row.windows = [r - d for d, r in windows]
        row.added = median(row.windows)
        row.note = f"{len(windows)} windows" + (f"; {failed} failed" if failed else "")
        return row

    # --- capacity: concurrent streams one process holds ------------------------------------------

    async def capacity(self, setup: Setup, transport: str, line: Line, llm: str) -> None:
        s = self.sizes
        # Every client stream on worker 0; on the 3-process broker the publisher's stream is
        # on worker 0 too (its result POSTs spread over all three).
        targets = self.relayed(
            setup,
            llm,
            stream=True,
            interval_ms=s.capacity_interval_ms,
            chunks=s.capacity_chunks,
            workers=[0],
        )
        stall = s.capacity_interval_ms / 1000 + 3.0
        held, note = 0, ""
        for n in s.capacity_steps:
            r = await self.loadgen.call(
                "streams",
                targets=targets,
                n=n,
                ramp_s=n / 500,
                stall_s=stall,
                expect=s.capacity_chunks,
            )
            await settle(setup.pids, limit=10.0)
            progress(
                f"  capacity {n}: ok {r['ok']}, stalled {r['stalled']}, peak {r['peak']}, "
                f"max gap {r['max_gap_ms']:.0f} ms"
            )
            if r["failed"] or r["stalled"]:
                note = f"at {n}: {r['failed']} failed, {r['stalled']} stalled; {r['errors'][:2]}"
                break
            held, note = n, f"peak {r['peak']} open at once, max gap {r['max_gap_ms']:.0f} ms"
        if held == s.capacity_steps[-1]:
            note += f"; largest step tried ({held})"
        row = self.row(setup, transport, line.name, "concurrent streams held, worker 0", "streams")
        row.direct, row.relayed, row.note = self.direct_capacity, held, note
        judge(row, "≥ 1,000, none stalled", at_least(1000.0), applies=max(s.capacity_steps) >= 1000)

    async def direct_baseline_capacity(self) -> None:
        s = self.sizes
        n = s.capacity_steps[-1]
        progress(f"direct baseline: {n} concurrent streams on the upstream")
        target = self.direct(
            stream=True, interval_ms=s.capacity_interval_ms, chunks=s.capacity_chunks
        )
        r = await self.loadgen.call(
            "streams",
            targets=[target],
            n=n,
            ramp_s=n / 500,
            stall_s=s.capacity_interval_ms / 1000 + 3.0,
            expect=s.capacity_chunks,
        )
        self.direct_capacity = n if not (r["failed"] or r["stalled"]) else 0

    # --- memory and threads ------------------------------------------------------------------

    async def memory(self, setup: Setup, transport: str) -> None:
        """RSS and threads of worker 0: per idle publisher session (N sessions, each holding
        a stream on worker 0), then per waiting request (N requests to worker 0 that the
        publisher holds unanswered). Worker 0 is restarted before each, so the heap that
        earlier scenarios grew (and freed) does not hide what these allocate."""
        s = self.sizes
        n_idle, n_wait = s.idle_sessions, s.waiting
        tag = uuid.uuid4().hex[:6]
        warm = 5

        async def fresh_publisher(llm: str) -> BenchLine:
            if not s.quick:  # at quick counts the figures are not judged: save the restarts
                await asyncio.to_thread(setup.broker.restart, 0)
            pub = BenchLine(self.log_dir)
            await pub.start(
                workers=[setup.urls[0]],
                stream_worker=0,
                publisher_token=setup.publisher_token,
                client_token=setup.client_token,
                transport=transport,
                llm=llm,
                upstream=self.upstream,
                hold=True,
            )
            return pub

        async def add_sessions(pub: BenchLine, names: list[str]) -> dict[str, Any]:
            result: dict[str, Any] = await pub.call(
                "start",
                workers=[setup.urls[0]],
                stream_worker=0,
                token=setup.publisher_token,
                transport=transport,
                upstream=self.upstream,
                names=names,
                rpc_timeout=600,
            )
            return result

        # Idle sessions. A few first, so lazy imports, caches and pools are not counted.
        pub = await fresh_publisher(f"idle-{tag}")
        try:
            await add_sessions(pub, [f"idle-{tag}-w{i}" for i in range(warm)])
            pid = setup.pids[0]
            await settle([pid])
            before = proc_sample(pid)
            opened = await add_sessions(pub, [f"idle-{tag}-{i}" for i in range(n_idle)])
            await settle([pid])
            await asyncio.sleep(s.memory_settle_s)
            idle = proc_sample(pid)
            stats = await pub.call("stats")
        finally:
            await pub.stop()
        ready = stats["ready"] - 1 - warm
        closed = stats["counts"].get("streams_closed", 0)
        row = self.row(setup, transport, "bench", f"RSS per idle session ({n_idle} open)", "KiB")
        row.relayed = (idle.rss_kib - before.rss_kib) / n_idle
        row.note = (
            f"worker 0 RSS {before.rss_kib / 1024:.1f} → {idle.rss_kib / 1024:.1f} MiB; "
            f"{ready}/{n_idle} streams ready, {closed} closed early; "
            f"registered and opened in {opened['seconds']:.1f} s"
        )
        judge(row, "≤ 50 KiB at 1,000", at_most(50.0, "relayed"), applies=n_idle >= 1000)
        self._threads_row(setup, transport, f"threads, {n_idle} idle sessions", before, idle)

        # Waiting requests, held unanswered by the publisher. A few first (warm-up).
        llm = f"wait-{tag}"
        targets = self.relayed(setup, llm, workers=[0])
        pub = await fresh_publisher(llm)
        try:
            warm_ok = await self._held_burst(pub, targets, warm, 0)
            pid = setup.pids[0]
            await settle([pid])
            before = proc_sample(pid)
            burst = asyncio.create_task(
                self.loadgen.call(
                    "burst", targets=targets, n=n_wait, ramp_s=n_wait / 1000, timeout=90.0
                )
            )
            held = await self._wait_held(pub, warm + n_wait, burst=burst) - warm
            await settle([pid])
            await asyncio.sleep(s.memory_settle_s)
            waiting = proc_sample(pid)
            await pub.call("release")
            answered = await burst
            pub_errors = (await pub.call("stats"))["errors"]
        finally:
            await pub.stop()
        await settle(setup.pids, limit=30.0)
        row = self.row(
            setup, transport, "bench", f"RSS per waiting request ({n_wait} in flight)", "KiB"
        )
        # Per request actually waiting (a request the broker refused holds nothing).
        row.relayed = (waiting.rss_kib - before.rss_kib) / max(held, 1)
        row.note = (
            f"worker 0 RSS {before.rss_kib / 1024:.1f} → {waiting.rss_kib / 1024:.1f} MiB; "
            f"{held}/{n_wait} held at the publisher; {answered['ok']}/{n_wait} answered "
            "after release"
            + (f"; clients saw {answered['errors'][:2]}" if answered["failed"] else "")
            + (f"; the publisher saw {pub_errors[:2]}" if pub_errors else "")
            + ("" if warm_ok else "; warm-up failed")
        )
        self._threads_row(setup, transport, f"threads, {n_wait} waiting requests", before, waiting)

    def _threads_row(
        self, setup: Setup, transport: str, metric: str, before: ProcSample, after: ProcSample
    ) -> None:
        row = self.row(setup, transport, "bench", metric, "")
        row.relayed = float(after.threads)
        row.note = f"worker 0: {before.threads} before → {after.threads} after"
        judge(row, "flat (≤ +2)", lambda _r: after.threads - before.threads <= 2)

    async def _held_burst(
        self, pub: BenchLine, targets: list[dict[str, Any]], n: int, base: int
    ) -> bool:
        burst = asyncio.create_task(self.loadgen.call("burst", targets=targets, n=n, timeout=60.0))
        await self._wait_held(pub, base + n, burst=burst)
        await pub.call("release")
        r = await burst
        await pub.call("set_hold", on=True)  # hold again for what follows
        return bool(r["failed"] == 0)

    async def _wait_held(
        self,
        pub: BenchLine,
        count: int,
        limit: float = 60.0,
        burst: asyncio.Task[Any] | None = None,
    ) -> int:
        """Wait until the publisher holds ``count`` tasks, or the burst ended, or the count
        has not grown for 3 s (the rest were refused: the broker answered them with errors)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        held = last = 0
        changed = loop.time()
        while loop.time() < deadline and not (burst is not None and burst.done()):
            held = int((await pub.call("stats"))["counts"].get("held", 0))
            if held >= count:
                break
            if held != last:
                last, changed = held, loop.time()
            elif loop.time() - changed > 3.0:
                break
            await asyncio.sleep(0.1)
        return held

    # --- wake: many requests, one hibernating LLM, three processes ------------------------------

    async def wake(self, setup: Setup, transport: str, line: Line) -> None:
        s = self.sizes
        llm = f"wake-{transport}-{line.name}-{uuid.uuid4().hex[:6]}"
        await self.start_line(line, setup, transport, llm, wake=WakeSpec(s.wake_delay_s))
        counts: list[int] = []
        spans: list[tuple[float, float]] = []
        failed = 0
        errors: list[str] = []
        try:
            for w in range(s.wake_windows):
                if w:
                    await line.rehibernate()
                wakes_before, _ = await line.wake_stats()
                d = await self.loadgen.call(
                    "burst", targets=[self.direct()], n=s.wake_requests, timeout=60.0
                )
                r = await self.loadgen.call(
                    "burst",
                    targets=self.relayed(setup, llm),
                    n=s.wake_requests,
                    ramp_s=0.1,
                    timeout=120.0,
                )
                wakes, confirmed = await line.wake_stats()
                counts.append(wakes - wakes_before)
                failed += r["failed"] + d["failed"]
                errors += r["errors"]
                last = max(r["done_at"]) if r["done_at"] else math.nan
                direct_span = (max(d["done_at"]) - d["started_at"]) * 1000 if d["done_at"] else 0
                spans.append((direct_span, (last - confirmed) * 1000 if confirmed else math.nan))
                await settle(setup.pids)
        finally:
            await line.stop()
        n = s.wake_requests
        row = self.row(setup, transport, line.name, f"wake count, {n} concurrent requests", "")
        row.relayed = float(max(counts)) if counts else math.nan
        row.windows = [float(c) for c in counts]
        row.note = f"per window: {counts}" + (f"; {failed} failed {errors[:2]}" if failed else "")
        judge(
            row,
            "= 1 per wake, 0 failed",
            lambda _r: bool(counts) and all(c == 1 for c in counts) and not failed,
        )
        row = self.row(setup, transport, line.name, "wake confirmed → last answer", "ms")
        row.direct = median([d for d, _ in spans])
        row.relayed = median([r for _, r in spans])
        row.windows = [r for _, r in spans]
        row.note = (
            f"{len(spans)} windows; direct = {n} concurrent requests to the upstream, "
            f"first sent → last answered; the wake takes {s.wake_delay_s:g} s"
        )


Scenario = Callable[[Setup, str, Line, str], Any]

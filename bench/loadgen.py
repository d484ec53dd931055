"""The load generator, run as its own process (``python -m bench.loadgen``, driven by
:mod:`bench.rpc`). It calls OpenAI-compatible ``/chat/completions`` endpoints through one
keep-alive ``aiohttp`` session (:mod:`bench.http`; cheaper per request than httpx or the
openai SDK).

A *target* is ``{"url": ".../v1/chat/completions", "headers": {...}, "body": {...}}``, and
optionally ``"min_bytes"``: a unary answer shorter than that fails. A list of targets is
used round-robin (requests spread over a broker's workers); in ``open_loop`` and ``streams``
a connect refused (a worker restarting: the soak's rolling restart) is sent to the next
target instead, as a load balancer does.

Calls:
- ``pairs``: concurrency 1; direct and relayed requests alternate (the order flips every
  pair), so both see the same machine at the same moment. Unary: latency; streaming: time to
  first token, total time, chunks.
- ``open_loop``: requests sent at fixed arrival times (``rate`` per second), whatever the
  answers do; latency counted from the *scheduled* time, so a late send counts against the
  system (no coordinated omission). Failures and late sends are counted.
- ``streams``: ``n`` concurrent streams, started over ``ramp_s``; a stream that goes
  ``stall_s`` without an event, errs, lacks chunks or ``[DONE]``, or whose chunks arrive
  out of order (the upstream numbers them) fails.
- ``burst``: ``n`` concurrent unary requests; latencies and the monotonic time each ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from . import rpc
from .http import JSON, data_lines, session

Target = dict[str, Any]
R = TypeVar("R")
MAX_ERRORS = 8
# The error code of an OpenAI-shaped error body: {"error": {..., "code": "<code>"}}.
ERROR_CODE = re.compile(rb'"code":\s*"([a-z_]+)"')


_session: aiohttp.ClientSession | None = None


def _http() -> aiohttp.ClientSession:
    """The process's one keep-alive session (made inside the running loop)."""
    global _session
    if _session is None:
        _session = session()
    return _session


@dataclass(frozen=True)
class _Request:
    url: str
    headers: dict[str, str]
    body: bytes
    min_bytes: int = 0  # a unary answer shorter than this fails (a big answer cut short)


class _Targets:
    """Prepared targets: headers merged and bodies encoded once."""

    def __init__(self, targets: list[Target]) -> None:
        self.items = [
            _Request(
                t["url"],
                {**(t.get("headers") or {}), **JSON},
                json.dumps(t["body"], separators=(",", ":")).encode(),
                int(t.get("min_bytes") or 0),
            )
            for t in targets
        ]
        self._i = 0

    def next(self) -> _Request:
        return self.items[self.take()]

    def take(self) -> int:
        """The next target's index (the following ones are this request's to retry on)."""
        i = self._i % len(self.items)
        self._i += 1
        return i


class _Errors:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    def add(self, what: str) -> None:
        self.count[what[:200]] += 1

    def top(self) -> list[str]:
        return [f"{n}x {what}" for what, n in self.count.most_common(MAX_ERRORS)]


class _Refused(Exception):
    """A connect refused: the request was never sent (a worker restarting)."""


async def _next_up(t: _Targets, send: Callable[[_Request], Awaitable[R]], moved: list[int]) -> R:
    """``send`` to the next target; a connect refused (never sent: a worker restarting, in
    a soak's rolling restart) goes on to the next one, as a load balancer does. ``moved``
    counts those."""
    first = t.take()
    order = [t.items[(first + k) % len(t.items)] for k in range(len(t.items))]
    # A worker taken out of rotation (set_out) gets no new request while others are in.
    order = [r for r in order if not r.url.startswith(tuple(_out))] or order
    for item in order[:-1]:
        try:
            return await send(item)
        except _Refused:
            moved[0] += 1
    return await send(order[-1])


# Base URLs of the workers out of rotation (a soak's rolling restart: set_out).
_out: set[str] = set()


async def set_out(urls: list[str]) -> int:
    """Take these workers' base URLs out of rotation for open_loop and streams (all others
    back in), as a load balancer does before a worker restarts."""
    _out.clear()
    _out.update(url.rstrip("/") + "/" for url in urls)
    return len(_out)


async def _unary(
    target: _Request, timeout: float, errors: _Errors, *, failover: bool = False
) -> bool:
    """One request; ``failover``: a refused connect raises _Refused instead of failing."""
    try:
        async with _http().post(
            target.url,
            data=target.body,
            headers=target.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            body = await response.read()
    except TimeoutError:
        errors.add("timeout")
        return False
    except aiohttp.ClientConnectorError as exc:
        if failover:
            raise _Refused() from exc
        errors.add(f"http: {exc!r}")
        return False
    except aiohttp.ClientError as exc:
        errors.add(f"http: {exc!r}")
        return False
    if response.status != 200:
        code = ERROR_CODE.search(body)
        errors.add(f"status {response.status} {code.group(1).decode() if code else ''}".strip())
        return False
    if not body.startswith(b"{"):
        errors.add(f"not JSON: {body[:120]!r}")
        return False
    if len(body) < target.min_bytes:
        errors.add(f"short answer: {len(body)} bytes, expected at least {target.min_bytes}")
        return False
    return True


@dataclass
class StreamResult:
    ok: bool = False
    ttft: float = 0.0
    total: float = 0.0
    chunks: int = 0
    frames: int = 0
    max_gap: float = 0.0
    opened_at: float = 0.0
    ended_at: float = 0.0


async def _stream(
    target: _Request,
    *,
    expect: int,
    stall_s: float,
    errors: _Errors,
    check_order: bool = True,
    leave_after: int = 0,
    failover: bool = False,
) -> StreamResult:
    """One streamed request. ``leave_after`` > 0: the client leaves (closes the connection)
    once that many chunks have arrived, and the stream counts as ok. ``failover``: a refused
    connect raises _Refused instead of failing."""
    result = StreamResult()
    started = time.perf_counter()
    last = started
    done = False
    try:
        async with _http().post(target.url, data=target.body, headers=target.headers) as response:
            if response.status != 200:
                body = await response.read()
                code = ERROR_CODE.search(body)
                errors.add(f"status {response.status} {code.group(1).decode() if code else ''}")
                return result
            result.opened_at = time.monotonic()
            async with contextlib.aclosing(data_lines(response)) as batches:
                while True:
                    try:
                        batch = await asyncio.wait_for(anext(batches), stall_s)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        errors.add(f"stalled {stall_s:g} s after {result.chunks} chunks")
                        result.max_gap = stall_s
                        return result
                    now = time.perf_counter()
                    if not batch:
                        continue  # a ping, or part of an event
                    result.frames += 1
                    result.max_gap = max(result.max_gap, now - last)
                    last = now
                    for data in batch:
                        if data == "[DONE]":
                            done = True
                        elif data.startswith('{"error"'):
                            errors.add(f"error event: {data[:160]}")
                            return result
                        else:
                            if result.chunks == 0:
                                result.ttft = now - started
                            # bench.upstream numbers its chunks: check they arrive in order.
                            if check_order and f"tok{result.chunks} " not in data:
                                errors.add(f"chunk {result.chunks} out of order or lost")
                                return result
                            result.chunks += 1
                    if leave_after and result.chunks >= leave_after:
                        result.ok = True
                        return result  # leaving the block closes the unread response
    except aiohttp.ClientConnectorError as exc:
        if failover:
            raise _Refused() from exc
        errors.add(f"http: {exc!r}")
        return result
    except aiohttp.ClientError as exc:
        errors.add(f"http: {exc!r}")
        return result
    result.total = time.perf_counter() - started
    result.ended_at = time.monotonic()
    if not done:
        errors.add(f"no [DONE] after {result.chunks} chunks")
    elif expect and result.chunks != expect:
        errors.add(f"{result.chunks} chunks, expected {expect}")
    else:
        result.ok = True
    return result


# --- calls ------------------------------------------------------------------------------


async def pairs(
    direct: Target,
    relayed: list[Target],
    n: int,
    stream: bool = False,
    expect: int = 0,
    timeout: float = 30.0,
) -> dict[str, Any]:
    d, r = _Targets([direct]), _Targets(relayed)
    out: dict[str, Any] = {"direct": [], "relayed": [], "direct_total": [], "relayed_total": []}
    out |= {"direct_chunks": 0, "relayed_chunks": 0, "failed_direct": 0, "failed_relayed": 0}
    errors = _Errors()
    for i in range(n):
        order = (("direct", d), ("relayed", r)) if i % 2 == 0 else (("relayed", r), ("direct", d))
        for side, targets in order:
            started = time.perf_counter()
            if stream:
                res = await _stream(targets.next(), expect=expect, stall_s=timeout, errors=errors)
                if res.ok:
                    out[side].append(res.ttft * 1000)
                    out[f"{side}_total"].append(res.total * 1000)
                    out[f"{side}_chunks"] += res.chunks
                else:
                    out[f"failed_{side}"] += 1
            elif await _unary(targets.next(), timeout, errors):
                out[side].append((time.perf_counter() - started) * 1000)
            else:
                out[f"failed_{side}"] += 1
    out["errors"] = errors.top()
    return out


async def open_loop(
    targets: list[Target], rate: float, duration: float, timeout: float = 10.0
) -> dict[str, Any]:
    t = _Targets(targets)
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * duration))
    lat: list[float] = []
    lags: list[float] = []
    failed = 0
    errors = _Errors()

    moved = [0]

    async def send(target: _Request) -> bool:
        return await _unary(target, timeout, errors, failover=True)

    async def one(scheduled: float) -> None:
        nonlocal failed
        try:
            ok = await _next_up(t, send, moved)
        except _Refused:
            errors.add("refused by every worker")
            ok = False
        if ok:
            lat.append((loop.time() - scheduled) * 1000)
        else:
            failed += 1

    tasks: list[asyncio.Task[None]] = []
    start = loop.time() + 0.02
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append((loop.time() - scheduled) * 1000)
        tasks.append(asyncio.create_task(one(scheduled)))
    # The rate actually offered: sends fall behind when the generator is starved of CPU.
    sending = max(loop.time() - start, 1e-9)
    await asyncio.gather(*tasks)
    wall = loop.time() - start
    return {
        "offered": count / max(sending, duration),
        "rate": rate,
        "sent": count,
        "ok": len(lat),
        "failed": failed,
        "lat": lat,
        "late": sum(1 for lag in lags if lag > 5.0),
        "max_lag_ms": max(lags),
        "wall": wall,
        "errors": errors.top(),
        "outcomes": dict(errors.count),
        "moved": moved[0],
    }


async def streams(
    targets: list[Target],
    n: int,
    ramp_s: float = 0.0,
    stall_s: float = 10.0,
    expect: int = 0,
    leave_after: int = 0,
) -> dict[str, Any]:
    t = _Targets(targets)
    errors = _Errors()
    loop = asyncio.get_running_loop()
    moved = [0]

    async def one(at: float) -> StreamResult:
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            return await _next_up(t, send, moved)
        except _Refused:
            errors.add("refused by every worker")
            return StreamResult()

    async def send(target: _Request) -> StreamResult:
        return await _stream(
            target,
            expect=expect,
            stall_s=stall_s,
            errors=errors,
            leave_after=leave_after,
            failover=True,
        )

    start = loop.time() + 0.02
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(start + ramp_s * i / max(n, 1)) for i in range(n)))
    wall = time.perf_counter() - t0
    # The most streams open at one moment (headers received until the last event).
    marks = sorted(
        [(r.opened_at, 1) for r in results if r.ok] + [(r.ended_at, -1) for r in results if r.ok]
    )
    peak = current = 0
    for _, step in marks:
        current += step
        peak = max(peak, current)
    ok = [r for r in results if r.ok]
    return {
        "n": n,
        "ok": len(ok),
        "failed": n - len(ok),
        "stalled": sum(1 for r in results if r.max_gap >= stall_s),
        "ttft": [r.ttft * 1000 for r in ok],
        "total": [r.total * 1000 for r in ok],
        "max_gap_ms": max((r.max_gap * 1000 for r in results), default=0.0),
        "chunks": sum(r.chunks for r in results),
        "frames": sum(r.frames for r in results),
        "wall": wall,
        "peak": peak,
        "errors": errors.top(),
        "outcomes": dict(errors.count),
        "moved": moved[0],
    }


async def burst(
    targets: list[Target], n: int, ramp_s: float = 0.0, timeout: float = 60.0
) -> dict[str, Any]:
    t = _Targets(targets)
    errors = _Errors()
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    done_at: list[float] = []

    async def one(at: float) -> bool:
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.perf_counter()
        ok = await _unary(t.next(), timeout, errors)
        if ok:
            lat.append((time.perf_counter() - started) * 1000)
            done_at.append(time.monotonic())
        return ok

    start = loop.time() + 0.02
    started_at = time.monotonic()
    oks = await asyncio.gather(*(one(start + ramp_s * i / max(n, 1)) for i in range(n)))
    return {
        "n": n,
        "ok": sum(oks),
        "failed": n - sum(oks),
        "lat": lat,
        "started_at": started_at,
        "done_at": done_at,
        "errors": errors.top(),
    }


async def hello() -> dict[str, Any]:
    return {"pid": os.getpid()}


if __name__ == "__main__":
    rpc.serve(
        {
            "pairs": pairs,
            "open_loop": open_loop,
            "streams": streams,
            "burst": burst,
            "hello": hello,
            "set_out": set_out,
        }
    )

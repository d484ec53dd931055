"""The in-harness publisher: a minimal, fast publisher written from PROTOCOL.md alone
(it imports nothing from mcpd). Run as its own process (``python -m bench.publisher``),
driven by :mod:`bench.rpc`.

For every ``infer`` task it calls the baseline upstream and answers: over SSE by POSTing
``result`` / ``chunks`` to the broker's workers in turn (a load balancer's spread), over
WebSocket on the socket. A stream's chunks go out as they arrive, whatever arrived together
in one message, one message at a time per task (the contract's rule). The upstream's JSON
body is spliced into the result as raw bytes, not parsed and re-encoded: the point is to
cost as little as possible, so that what remains is mcpd's cost.

Extras for the harness: many sessions at once (idle-session memory), ``hold`` (keep infer
tasks waiting until ``release``: waiting-request memory), and wake answers after a delay,
with the monotonic time of each confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from . import rpc
from .http import JSON, data_lines, session

Frame = dict[str, Any]
WS_RECONNECT = 4503  # a draining worker's close code: reconnect elsewhere at once


@dataclass
class Session:
    name: str
    sid: str = ""
    ws: ClientConnection | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class Publisher:
    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.http: aiohttp.ClientSession | None = None
        self.workers: list[str] = []
        self.stream_url = ""
        self.token = ""
        self.auth: dict[str, str] = {}
        self.post_headers: dict[str, str] = {}
        self.transport = "sse"
        self.upstream = ""  # http://host:port: a task's endpoint (/v1/...) goes after it
        self.wake_delay = 0.0
        self.hold = False
        self.released = asyncio.Event()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wake_confirmed_at: list[float] = []
        self._rr = 0
        self.out: set[str] = set()  # workers out of rotation (set_out)

    # --- setup -----------------------------------------------------------------------------

    async def start(
        self,
        *,
        workers: list[str],
        stream_worker: int,
        token: str,
        transport: str,
        upstream: str,
        names: list[str],
        model: str = "bench-upstream",
        status: str = "active",
        wake_delay: float | None = None,
        hold: bool | None = None,
        concurrency: int = 8,
    ) -> dict[str, Any]:
        """Register and connect sessions, one LLM each; may be called again to add more
        (``wake_delay`` and ``hold`` are kept unless given)."""
        assert transport in ("sse", "ws")
        self.token = token
        self.auth = {"Authorization": f"Bearer {token}"}
        self.post_headers = {**self.auth, **JSON}
        self.transport = transport
        if self.http is None:
            self.http = session()
            self.workers = [url.rstrip("/") for url in workers]
            self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.stream_url = workers[stream_worker % len(workers)].rstrip("/")
        if wake_delay is not None:
            self.wake_delay = wake_delay
        if hold is not None:
            self.hold = hold
        new = [Session(name) for name in names]
        self.sessions.extend(new)
        gate = asyncio.Semaphore(concurrency)

        async def bring_up(s: Session) -> None:
            async with gate:
                await self._register(s, model, status)
                s.reader = asyncio.create_task(self._hold_stream(s))
                await asyncio.wait_for(s.ready.wait(), 30)

        started = time.perf_counter()
        await asyncio.gather(*(bring_up(s) for s in new))
        return {"sessions": len(new), "seconds": time.perf_counter() - started}

    async def _register(self, s: Session, model: str, status: str) -> None:
        body = json.dumps(
            {
                "providerSessionId": None,
                "providers": [{"name": s.name, "type": "bench", "model": model, "status": status}],
            }
        ).encode()
        assert self.http is not None
        url = f"{self.workers[0]}/api/v1/virtual/register"
        async with self.http.post(url, data=body, headers=self.post_headers) as response:
            answer = await response.read()
        if response.status != 200:
            raise RuntimeError(f"register {s.name}: {response.status} {answer[:300]!r}")
        s.sid = json.loads(answer)["providerSessionId"]

    async def _hold_stream(self, s: Session) -> None:
        """Hold the session's stream; when a worker drains (SSE ``event: reconnect``,
        WebSocket close 4503: a rolling restart, bench/soak.py) open it again at once on the
        next worker, as the contract's agents do."""
        refused = 0  # connects refused in a row since the stream was last open
        while True:
            try:
                if self.transport == "sse":
                    handed_over = await self._read_sse(s)
                else:
                    handed_over = await self._read_ws(s)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # refused (aiohttp's and websockets' both): a worker down
                refused += 1
                handed_over = self.counts["reconnects"] > 0 and refused < 2 * len(self.workers)
                if not handed_over:
                    self.errors[f"stream: {exc!r}"[:200]] += 1
                await asyncio.sleep(0.1)
            except Exception as exc:
                self.errors[f"stream: {exc!r}"[:200]] += 1
                handed_over = False
            finally:
                self.counts["streams_closed"] += 1
            if not handed_over:
                return
            if s.ready.is_set():
                refused = 0
            s.ready.clear()
            self.counts["reconnects"] += 1
            at = self.workers.index(self.stream_url) if self.stream_url in self.workers else 0
            self.stream_url = self.workers[(at + 1) % len(self.workers)]

    async def _read_sse(self, s: Session) -> bool:
        """Read the SSE stream until it ends; True if the worker said to reconnect."""
        assert self.http is not None
        url = f"{self.stream_url}/api/v1/virtual/sessions/{s.sid}/stream"
        async with self.http.get(url, headers=self.auth) as response:
            if response.status != 200:
                raise RuntimeError(f"stream {response.status}")
            # The data tells the events apart: a task frame has a "kind", the ready event
            # only the session id, the reconnect event's a reason. On that one, go at once:
            # the draining worker ends the response only once it has seen the new stream.
            async for batch in data_lines(response):
                for data in batch:
                    frame = json.loads(data)
                    if "kind" in frame:
                        self._on_frame(s, frame)
                    elif "providerSessionId" in frame:
                        s.ready.set()
                    elif frame.get("reason") == "draining":
                        return True
            return False

    async def _read_ws(self, s: Session) -> bool:
        """Read the socket until it closes; True if the worker said to reconnect."""
        url = self.stream_url.replace("http", "ws", 1) + f"/api/v1/virtual/sessions/{s.sid}/ws"
        async with websockets.connect(
            url,
            additional_headers=self.auth,
            max_size=None,
            compression=None,
            proxy=None,
            ping_interval=None,  # daphne pings us (--ping-interval); we answer
        ) as ws:
            s.ws = ws
            try:
                async for message in ws:
                    frame = json.loads(message)
                    kind = frame.get("type")
                    if kind == "ready":
                        s.ready.set()
                    elif kind == "task":
                        self._on_frame(s, frame)
                    elif kind == "protocol_error":
                        self.errors[f"protocol_error: {frame.get('message')}"[:200]] += 1
            except websockets.ConnectionClosed as closed:
                if closed.rcvd is None or closed.rcvd.code != WS_RECONNECT:
                    raise
            finally:
                s.ws = None
        return ws.close_code == WS_RECONNECT

    # --- tasks -----------------------------------------------------------------------------

    def _on_frame(self, s: Session, frame: Frame) -> None:
        kind = frame.get("kind")
        tid = frame["taskId"]
        self.counts[f"frame_{kind}"] += 1
        if kind == "cancel":
            task = s.tasks.pop(tid, None)
            if task is not None:
                task.cancel()
            return
        if kind == "wake":
            coro = self._wake(s, tid)
        elif kind == "infer" and frame.get("streaming"):
            coro = self._infer_stream(s, frame)
        elif kind == "infer":
            coro = self._infer(s, frame)
        else:
            return
        task = asyncio.create_task(coro)
        s.tasks[tid] = task
        task.add_done_callback(lambda _t: s.tasks.pop(tid, None))

    async def _wake(self, s: Session, tid: str) -> None:
        await asyncio.sleep(self.wake_delay)
        self.wake_confirmed_at.append(time.monotonic())
        await self._send(s, tid, "result", b'{"status":200,"body":{"ok":true}}')

    async def _wait_release(self) -> None:
        if self.hold:
            self.counts["held"] += 1
            await self.released.wait()

    async def _upstream_call(self, frame: Frame) -> tuple[str, bytes]:
        """The upstream URL and body of an infer task, once ``hold`` lets it go."""
        await self._wait_release()
        return self.upstream + frame["endpoint"], json.dumps(
            frame["body"], separators=(",", ":")
        ).encode()

    async def _infer(self, s: Session, frame: Frame) -> None:
        tid = frame["taskId"]
        try:
            url, body = await self._upstream_call(frame)
            assert self.http is not None
            async with self.http.post(url, data=body, headers=JSON) as response:
                raw = await response.read()
            if raw[:1] not in (b"{", b"["):
                raw = json.dumps(raw.decode(errors="replace")).encode()
            await self._send(s, tid, "result", b'{"status":%d,"body":%s}' % (response.status, raw))
        except aiohttp.ClientError as exc:
            self.errors[f"upstream: {exc}"[:200]] += 1
            await self._send(s, tid, "error", json.dumps({"error": str(exc)}).encode())

    async def _infer_stream(self, s: Session, frame: Frame) -> None:
        tid = frame["taskId"]
        queue: list[dict[str, Any]] = []
        more = asyncio.Event()
        ended = False

        async def pump() -> None:
            # One chunks message in flight per task; what piles up meanwhile goes next.
            while True:
                await more.wait()
                more.clear()
                while queue:
                    batch = queue[:]
                    queue.clear()
                    self.counts["chunk_messages"] += 1
                    self.counts["chunks"] += len(batch)
                    payload = json.dumps({"chunks": batch}, separators=(",", ":")).encode()
                    await self._send(s, tid, "chunks", payload)
                if ended:
                    return

        sender = asyncio.create_task(pump())
        saw_done = False
        try:
            url, body = await self._upstream_call(frame)
            assert self.http is not None
            async with self.http.post(url, data=body, headers=JSON) as response:
                if response.status != 200:
                    raw = await response.read()
                    await self._send(
                        s, tid, "result", b'{"status":%d,"body":%s}' % (response.status, raw)
                    )
                    return
                # What arrived together goes out together (the pump runs when we wait).
                async for batch in data_lines(response):
                    for data in batch:
                        saw_done = data == "[DONE]"
                        queue.append({"data": data, "done": saw_done})
                    if queue:
                        more.set()
            if not saw_done:
                queue.append({"data": "[DONE]", "done": True})
        except aiohttp.ClientError as exc:
            self.errors[f"upstream: {exc}"[:200]] += 1
        finally:
            ended = True
            more.set()
            try:
                await sender
            except asyncio.CancelledError:
                sender.cancel()
                raise

    async def _send(self, s: Session, tid: str, kind: str, payload: bytes) -> None:
        """Send a result/chunks/error: on the socket (WebSocket) or by POST (SSE)."""
        self.counts[f"sent_{kind}"] += 1
        try:
            if self.transport == "ws" and s.ws is not None:
                # {"type": kind, "taskId": tid, ...payload's fields}
                head = f'{{"type":"{kind}","taskId":{json.dumps(tid)},'.encode()
                try:
                    await s.ws.send((head + payload[1:]).decode())
                    return
                except websockets.ConnectionClosed:
                    # The worker drained (a rolling restart): the tasks it sent go on, and
                    # their answers go to any worker by POST.
                    self.counts["answers_posted_after_close"] += 1
            assert self.http is not None
            first, self._rr = self._rr, self._rr + 1
            ring = [w for w in self.workers if w not in self.out] or self.workers
            for attempt in range(3 * len(self.workers)):
                worker = ring[(first + attempt) % len(ring)]
                url = f"{worker}/api/v1/virtual/tasks/{tid}/{kind}"
                try:
                    async with self.http.post(
                        url, data=payload, headers=self.post_headers
                    ) as response:
                        answer = await response.read()
                except aiohttp.ClientConnectorError:
                    # Never sent (a worker restarting): the next worker takes it, as behind
                    # a load balancer.
                    if attempt == 3 * len(self.workers) - 1:
                        raise
                    self.counts["answers_moved"] += 1
                    continue
                if response.status != 503 or attempt == 3 * len(self.workers) - 1:
                    break
                # Refused for now (the broker's Redis restarting): not delivered, so sent
                # again, as the contract's Retry-After asks (a chunk dropped would leave a
                # gap in the client's stream).
                self.counts["answers_retried"] += 1
                await asyncio.sleep(0.2)
            if response.status != 204:
                self.errors[f"{kind} POST {response.status}: {answer[:100]!r}"] += 1
        except (aiohttp.ClientError, websockets.WebSocketException) as exc:
            self.errors[f"{kind}: {exc!r}"[:200]] += 1

    # --- control ---------------------------------------------------------------------------

    async def set_out(self, urls: list[str]) -> int:
        """Post no answers to these workers (all others back in), as behind a load balancer
        that took them out before a restart."""
        self.out = {url.rstrip("/") for url in urls}
        return len(self.out)

    async def release(self) -> int:
        self.released.set()
        return self.counts["held"]

    async def set_hold(self, on: bool) -> None:
        self.hold = on
        if on and self.released.is_set():
            self.released = asyncio.Event()

    async def stats(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "errors": [f"{n}x {e}" for e, n in self.errors.most_common(8)],
            "wake_confirmed_at": self.wake_confirmed_at,
            "sessions": len(self.sessions),
            "ready": sum(1 for s in self.sessions if s.ready.is_set()),
            "sids": [s.sid for s in self.sessions[:4]],
        }

    async def set_status(self, name: str, status: str) -> int:
        s = next(s for s in self.sessions if s.name == name)
        body = json.dumps({"providerSessionId": s.sid, "llmName": name, "status": status})
        assert self.http is not None
        url = f"{self.workers[0]}/api/v1/virtual/status"
        async with self.http.post(url, data=body.encode(), headers=self.post_headers) as response:
            await response.read()
        return response.status

    async def stop(self) -> None:
        for s in self.sessions:
            if s.reader is not None:
                s.reader.cancel()
        for s in self.sessions:
            if s.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await s.reader
        self.sessions.clear()


if __name__ == "__main__":
    publisher = Publisher()
    rpc.serve(
        {
            "start": publisher.start,
            "release": publisher.release,
            "set_hold": publisher.set_hold,
            "stats": publisher.stats,
            "set_status": publisher.set_status,
            "set_out": publisher.set_out,
            "stop": publisher.stop,
        }
    )

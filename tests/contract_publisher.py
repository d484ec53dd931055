"""A test publisher written from PROTOCOL.md alone (it imports nothing from mcpd).

It registers, holds a control stream (SSE or WebSocket), collects the frames it receives,
and answers tasks by HTTP POST to any worker, or over the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import websockets

Frame = dict[str, Any]


class ContractPublisher:
    def __init__(self, base_url: str, token: str, *, transport: str = "sse") -> None:
        assert transport in ("sse", "ws")
        self.base_url = base_url
        self.token = token
        self.transport = transport
        self.session_id: str | None = None
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self.seen: list[Frame] = []
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(30.0)
        )
        self._reader: asyncio.Task[None] | None = None
        self._ws: Any = None
        self._ready: asyncio.Event = asyncio.Event()
        self.closed: asyncio.Event = asyncio.Event()
        self.stream_status: int | None = None
        self.pings = 0
        self._server: asyncio.Task[None] | None = None

    # --- registry ------------------------------------------------------------------------------

    async def register(
        self,
        providers: list[dict[str, Any]],
        *,
        session_id: str | None = None,
        url: str | None = None,
    ) -> httpx.Response:
        sid = session_id if session_id is not None else self.session_id
        response = await self.http.post(
            f"{url or self.base_url}/api/v1/virtual/register",
            json={"providerSessionId": sid, "providers": providers},
        )
        if response.status_code == 200:
            self.session_id = response.json()["providerSessionId"]
        return response

    async def heartbeat(self, url: str | None = None) -> httpx.Response:
        return await self.http.post(
            f"{url or self.base_url}/api/v1/virtual/heartbeat",
            json={"providerSessionId": self.session_id},
        )

    async def set_status(self, llm_name: str, status: str) -> httpx.Response:
        return await self.http.post(
            f"{self.base_url}/api/v1/virtual/status",
            json={"providerSessionId": self.session_id, "llmName": llm_name, "status": status},
        )

    # --- the control stream ----------------------------------------------------------------------

    async def connect(self, url: str | None = None, *, wait_ready: bool = True) -> None:
        assert self.session_id, "register first"
        self._ready = asyncio.Event()
        self.closed = asyncio.Event()
        base = url or self.base_url
        if self.transport == "sse":
            self._reader = asyncio.create_task(self._read_sse(base))
        else:
            self._reader = asyncio.create_task(self._read_ws(base.replace("http", "ws", 1)))
        if wait_ready:
            await asyncio.wait_for(self._ready.wait(), 10)

    async def _read_sse(self, base: str) -> None:
        url = f"{base}/api/v1/virtual/sessions/{self.session_id}/stream"
        try:
            async with self.http.stream("GET", url, timeout=httpx.Timeout(None)) as response:
                self.stream_status = response.status_code
                if response.status_code != 200:
                    return
                event: str | None = "message"
                data: list[str] = []
                event_id: str | None = None
                async for line in response.aiter_lines():
                    if line == "":
                        if data:
                            self._on_frame(event, json.loads("\n".join(data)), event_id)
                        event, data, event_id = "message", [], None
                    elif line.startswith(":"):
                        self.pings += 1
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line.startswith("id:"):
                        event_id = line[3:].strip()
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()

    async def _read_ws(self, base: str) -> None:
        url = f"{base}/api/v1/virtual/sessions/{self.session_id}/ws"
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {self.token}"}, max_size=None
            ) as ws:
                self._ws = ws
                async for message in ws:
                    frame = json.loads(message)
                    kind = frame.pop("type", None)
                    self._on_frame(kind, frame, frame.get("taskId"))
        except (websockets.WebSocketException, OSError, asyncio.CancelledError):
            pass
        finally:
            self._ws = None
            self.closed.set()

    def _on_frame(self, event: str | None, data: Frame, event_id: str | None) -> None:
        if event == "ready":
            self._ready.set()
            return
        frame = {**data, "_event": event, "_id": event_id}
        self.seen.append(frame)
        self.frames.put_nowait(frame)

    async def next_frame(self, kind: str | None = None, timeout: float = 10.0) -> Frame:
        """The next task frame (of ``kind``, skipping others)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await asyncio.wait_for(self.frames.get(), max(remaining, 0.001))
            if kind is None or frame.get("kind") == kind:
                return frame

    async def next_event(self, event: str, timeout: float = 10.0) -> Frame:
        """The next message whose SSE event name / WebSocket ``type`` is ``event`` (skipping
        others), e.g. ``protocol_error``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await asyncio.wait_for(self.frames.get(), max(remaining, 0.001))
            if frame.get("_event") == event:
                return frame

    async def disconnect(self) -> None:
        if self._server is not None:
            self._server.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._reader = None

    async def aclose(self) -> None:
        await self.disconnect()
        await self.http.aclose()

    # --- answers -------------------------------------------------------------------------------

    async def send_ws(self, frame: Frame) -> None:
        assert self._ws is not None, "no socket"
        await self._ws.send(json.dumps(frame))

    async def send_ws_raw(self, message: str | bytes) -> None:
        """Send a message as it is (for malformed frames)."""
        assert self._ws is not None, "no socket"
        await self._ws.send(message)

    async def result(
        self, task_id: str, status: int, body: Any, *, url: str | None = None
    ) -> httpx.Response:
        return await self.http.post(
            f"{url or self.base_url}/api/v1/virtual/tasks/{task_id}/result",
            json={"status": status, "body": body},
        )

    async def chunks(
        self, task_id: str, chunks: list[dict[str, Any]], *, url: str | None = None
    ) -> httpx.Response:
        return await self.http.post(
            f"{url or self.base_url}/api/v1/virtual/tasks/{task_id}/chunks",
            json={"chunks": chunks},
        )

    async def error(self, task_id: str, message: str, *, url: str | None = None) -> httpx.Response:
        return await self.http.post(
            f"{url or self.base_url}/api/v1/virtual/tasks/{task_id}/error",
            json={"error": message},
        )

    def serve(self, handler: Callable[[Frame], Coroutine[Any, Any, None]]) -> None:
        """Answer every frame with ``handler`` in the background, each in its own task."""

        async def loop() -> None:
            tasks: set[asyncio.Task[None]] = set()
            while True:
                frame = await self.frames.get()
                task = asyncio.create_task(handler(frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        self._server = asyncio.create_task(loop())


def chat_answer(text: str) -> dict[str, Any]:
    """A minimal OpenAI chat.completion body the SDK parses."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chat_chunk(text: str, *, finish: bool = False) -> str:
    """One OpenAI chat.completion.chunk as SSE data."""
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {} if finish else {"content": text},
                    "finish_reason": "stop" if finish else None,
                }
            ],
        }
    )

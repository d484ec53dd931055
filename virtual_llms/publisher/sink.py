"""Where one task's answer goes: the WebSocket control stream while it is open (infer tasks
of a WebSocket agent), else the broker's HTTP task endpoints."""

from __future__ import annotations

from typing import Any

from .batcher import Chunk
from .broker import MAX_MESSAGE, BrokerClient
from .control import SOCKET_RESULT_BYTES, Uplink


class TaskSink:
    """One task's answer. Over the socket a refusal comes back later, as a ``protocol_error``
    (see :class:`Uplink`); over HTTP it raises here (:class:`TaskGone`, :class:`BrokerError`).

    A task's frames all go the same way, so they reach the broker in order: the socket
    carries them while it is open; when it closes, the broker fails the task ("publisher
    disconnected") and the HTTP fallback gets the 404 that stops it. Only a result too big
    for the socket goes over HTTP while it is open (it is the task's one and only frame)."""

    def __init__(self, broker: BrokerClient, task_id: str, uplink: Uplink | None = None) -> None:
        self.broker = broker
        self.task_id = task_id
        self.uplink = uplink

    async def _on_socket(self, frame: dict[str, Any], *, max_bytes: int | None = None) -> bool:
        if self.uplink is None:
            return False
        return await self.uplink.send({**frame, "taskId": self.task_id}, max_bytes=max_bytes)

    async def result(self, status: int, body: Any) -> None:
        frame = {"type": "result", "status": status, "body": body}
        if not await self._on_socket(frame, max_bytes=SOCKET_RESULT_BYTES):
            await self.broker.result(self.task_id, status, body)

    async def chunks(self, chunks: list[Chunk]) -> None:
        if not await self._on_socket({"type": "chunks", "chunks": chunks}):
            await self.broker.chunks(self.task_id, chunks)

    async def error(self, message: str) -> None:
        frame = {"type": "error", "error": message[:MAX_MESSAGE] or "failed"}
        if not await self._on_socket(frame):
            await self.broker.error(self.task_id, message)

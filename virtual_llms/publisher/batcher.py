"""The chunks of one streamed answer, sent to the broker in order, one POST at a time.

While a POST is in flight, new chunks pile up; the next POST carries all of them (up to a
size bound). So a fast upstream costs few POSTs and a slow one forwards each chunk at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypedDict


class Chunk(TypedDict, total=False):
    data: str
    done: bool


Send = Callable[[list[Chunk]], Awaitable[None]]

# Far under the broker's request body limit (MCPD_MAX_BODY_BYTES, 10 MiB by default).
MAX_BATCH_BYTES = 1024 * 1024


class ChunkBatcher:
    """``put`` chunks from the producer; :meth:`run` (a task of its own) sends them.

    ``run`` returns once a chunk with ``done`` is sent, or once :meth:`close` was called and
    everything put before it is sent. An exception from ``send`` ends ``run`` with it.
    """

    def __init__(self, send: Send, *, max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self._send = send
        self._max = max_batch_bytes
        self._pending: list[Chunk] = []
        self._ready = asyncio.Event()
        self._closed = False
        self.posts = 0
        self.chunks = 0

    def put(self, data: str, *, done: bool = False) -> None:
        if self._closed:
            raise RuntimeError("the stream already ended")
        self._pending.append({"data": data, "done": True} if done else {"data": data})
        if done:
            self._closed = True
        self._ready.set()

    def close(self) -> None:
        """No more chunks: send what is pending, then stop (without a ``done`` chunk)."""
        self._closed = True
        self._ready.set()

    def _take(self) -> list[Chunk]:
        size = 0
        count = 0
        for chunk in self._pending:
            size += len(chunk["data"])
            if count and size > self._max:
                break
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = self._take()
            await self._send(batch)
            self.posts += 1
            self.chunks += len(batch)
            if batch[-1].get("done"):
                return

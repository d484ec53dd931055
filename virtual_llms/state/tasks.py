"""Open tasks: ``t:<task id>:<publisher token id>`` → the requester's record (its hub channel
first). The token id is part of the key, so an answer from another token finds nothing.
Whoever *takes* a record ends the task, once. With Redis, the scripts that write, read or
take a record also publish the task's frame or event to the hub that waits for it, in the
same round trip: the caller passes the channel layer's bytes (events.direct_payload), or
None to send them itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .base import TASK_TTL_SECONDS, MemoryStore, RedisConn
from .slots import MemorySlots

if TYPE_CHECKING:
    from .routing import MemoryQueue


class TaskStore(Protocol):
    async def put(self, tid: str, token_id: int, record: str) -> None:
        """Open (or give back) a task's record."""

    async def open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes | None
    ) -> bool:
        """put(), and ``payload`` published to ``channel`` when given and this store can
        publish: True if it was published (else the caller sends the frame)."""

    async def get(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        """The open task's record (TTL renewed), if its requester is alive; ``payload``, if
        given, is published to the requester's hub."""

    async def take(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        """Take the record: whoever gets it ends the task. ``payload`` as for get()."""


class MemoryTasks:
    """One process: the requester is this process, always alive; nothing is published (the
    in-memory layer's events.direct_payload is None, so no payload is ever passed). A taken
    task gives its backend's slot back and tells the queue's head, as in Redis."""

    def __init__(self, store: MemoryStore, slots: MemorySlots, queue: MemoryQueue) -> None:
        self._store = store
        self._slots = slots
        self._queue = queue

    async def put(self, tid: str, token_id: int, record: str) -> None:
        self._store.set(f"t:{tid}:{token_id}", record, TASK_TTL_SECONDS)

    async def open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes | None
    ) -> bool:
        await self.put(tid, token_id, record)
        return False

    async def get(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        value: str | None = self._store.get(f"t:{tid}:{token_id}")
        if value is not None:
            self._store.set(f"t:{tid}:{token_id}", value, TASK_TTL_SECONDS)
        return value

    async def take(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        value: str | None = self._store.get(f"t:{tid}:{token_id}")
        if value is not None:
            self._store.delete(f"t:{tid}:{token_id}")
            llm_id = self._slots.release(value)
            if llm_id is not None:
                self._queue.notify_head(llm_id)
        return value


class RedisTasks:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def put(self, tid: str, token_id: int, record: str) -> None:
        await self._conn.client().set(
            self._conn.key("t", tid, token_id), record, ex=TASK_TTL_SECONDS
        )

    async def open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes | None
    ) -> bool:
        if payload is None:
            await self.put(tid, token_id, record)
            return False
        await self._conn.script("task_open")(
            keys=[self._conn.key("t", tid, token_id)],
            args=[record, TASK_TTL_SECONDS, channel, payload],
        )
        return True

    async def _read(self, tid: str, token_id: int, take: bool, payload: bytes | None) -> str | None:
        value = await self._conn.script("task_read")(
            keys=[self._conn.key("t", tid, token_id)],
            args=[self._conn.prefix, "1" if take else "0", TASK_TTL_SECONDS, payload or b""],
        )
        return value if value is None else str(value)

    async def get(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        return await self._read(tid, token_id, False, payload)

    async def take(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        return await self._read(tid, token_id, True, payload)

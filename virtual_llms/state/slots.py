"""Slots: the tasks in flight on each backend, counted across all workers.

``f:<llm id>:<session>`` is a hash whose fields are the hub channels of the workers that
dispatched the backend's tasks, each with its count. A task's slot is taken in the script
that dispatches it (routing) and given back in the script that takes its record
(tasks.take), so a slot is never counted twice or lost; the fields of a worker that died
are dropped by the next script that reads them (its liveness key is gone), so a killed
worker's slots are free again within WORKER_TTL_MS of the next read.
"""

from __future__ import annotations

from typing import Protocol

from .base import MemoryStore, RedisConn


def slot_key(llm_id: str, sid: str) -> str:
    return f"f:{llm_id}:{sid}"


class SlotStore(Protocol):
    def counts_sync(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        """Tasks in flight on each of these backends of the LLM (from sync code)."""

    async def counts(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        """The same, from async code."""


class MemorySlots:
    """One process: the counts live beside the other keys (routing writes them)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    def held(self, llm_id: str, sid: str) -> dict[str, int]:
        """The mutable count hash of one backend."""
        key = slot_key(llm_id, sid)
        counts: dict[str, int] | None = self._store.get(key)
        if counts is None:
            counts = {}
            self._store.set(key, counts, float("inf"))
        return counts

    def release(self, record: str) -> str | None:
        """The task of ``record`` ended: its slot is free. The LLM's id, for a task that
        held a slot (its queue's head is then told)."""
        reply, _, rest = record.partition(" ")
        llm_id, _, sid = rest.partition(" ")
        if not sid:
            return None
        counts = self.held(llm_id, sid)
        if counts.get(reply, 0) > 1:
            counts[reply] -= 1
        else:
            counts.pop(reply, None)
        return llm_id

    def counts_sync(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        return {sid: sum(self.held(llm_id, sid).values()) for sid in sids}

    async def counts(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        return self.counts_sync(llm_id, sids)


class RedisSlots:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    def _keys(self, llm_id: str, sids: list[str]) -> list[str]:
        return [self._conn.prefix + slot_key(llm_id, sid) for sid in sids]

    def counts_sync(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        if not sids:
            return {}
        values = self._conn.sync_script("slot_counts")(
            keys=self._keys(llm_id, sids), args=[self._conn.key("w", "")]
        )
        return {sid: int(v) for sid, v in zip(sids, values, strict=True)}

    async def counts(self, llm_id: str, sids: list[str]) -> dict[str, int]:
        if not sids:
            return {}
        values = await self._conn.script("slot_counts")(
            keys=self._keys(llm_id, sids), args=[self._conn.key("w", "")]
        )
        return {sid: int(v) for sid, v in zip(sids, values, strict=True)}

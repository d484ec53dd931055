"""Routing and the queue: which backend of an LLM gets a task, and the per-LLM FIFO of
requests waiting for a free slot, shared by all workers.

:meth:`RoutingStore.route` does, in one round trip (Redis: ``lua/route.lua``), what the
common request needs before its publisher gets the task: check that the caller's cached row
is current (its stamps), find the candidates that hold a live stream and their tasks in
flight (slots.py), choose the one with the most free slots, keep the queue's order (waiters
first), take the slot, write the task's record and publish its frame to the chosen
stream's hub. A task's slot is given back by the script that takes its record (tasks.py),
which also tells the queue's head. See docs/design.md "Fleets".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .base import TASK_TTL_SECONDS, MemoryStore, Presence, RedisConn, decode_presence
from .presence import MemoryPresence
from .slots import MemorySlots
from .stamps import ALL_ROWS, MemoryStamps, name_field

Verdict = Literal["sent", "full", "none", "stale"]


@dataclass(frozen=True)
class Candidate:
    """A backend a task may go to: its session, its publisher token, its slots (None: no
    limit) and whether it is draining (counted as live, never chosen)."""

    sid: str
    token_id: int
    slots: int | None
    draining: bool = False


@dataclass(frozen=True)
class Routed:
    """route()'s answer: the stamps it read, its verdict, and for ``sent`` the candidate
    chosen, who holds its stream and whether the frame was published (else the caller
    sends it); for ``full`` the caller's position in the queue (or the queue's length)."""

    stamp: str
    verdict: Verdict
    candidate: Candidate | None = None
    presence: Presence | None = None
    published: bool = False
    position: int = 0


def task_record(reply: str, llm_id: str, sid: str) -> str:
    """An open task's record: the requester's hub first; a routed task's backend after it."""
    return f"{reply} {llm_id} {sid}"


class RoutingStore(Protocol):
    async def stamp(self, name: str) -> str:
        """The stamps of the row called ``name`` (the cache's key, rowcache.py)."""

    async def route(
        self,
        *,
        name: str,
        stamp: str,
        llm_id: str,
        task_id: str,
        reply: str,
        candidates: Sequence[Candidate],
        payload: bytes | None,
        waiter: str | None = None,
    ) -> Routed:
        """See the module's docstring. ``payload``: the frame's message without its
        ``sid``, ``epoch`` and ``tokenId`` (events.splice_base), or None to send it from
        the caller; ``waiter``: the caller's id when it is in the queue."""

    async def join(
        self,
        *,
        llm_id: str,
        waiter: str,
        channel: str,
        notice: Mapping[str, Any],
        payload: bytes | None,
        limit: int,
        ttl: float,
    ) -> int:
        """Join the queue; the position (0: next), or -1 if ``limit`` waiters wait already.
        ``notice`` (``payload``, its bytes) goes to ``channel`` when a slot may be free."""

    async def leave(self, *, llm_id: str, waiter: str) -> None:
        """Leave the queue (the head hears of it)."""

    async def position(self, *, llm_id: str, waiter: str) -> int:
        """The waiter's position (0: next), -1 if it is not queued."""

    def depths_sync(self, llm_ids: list[str]) -> dict[str, int]:
        """How many requests wait for each LLM (from sync code: the REST API, metrics)."""

    async def kick(self, llm_ids: list[str]) -> None:
        """Tell the queue's head of each LLM that a slot may be free (a stream was bound)."""

    def on_notice(self, deliver: Callable[[str, Mapping[str, Any]], None]) -> None:
        """Where notices go when this store cannot publish them (the one-process broker:
        to the hub); the Redis store publishes them from its scripts."""


class MemoryQueue:
    """One process's queues: per LLM, waiter ids in order with their hub and notice. The
    hub that makes notices arrive (``deliver``) is set when it starts."""

    def __init__(self) -> None:
        self.waiting: dict[str, dict[str, tuple[str, Mapping[str, Any]]]] = {}
        self.deliver: Callable[[str, Mapping[str, Any]], None] | None = None

    def notify_head(self, llm_id: str) -> None:
        waiters = self.waiting.get(llm_id)
        if waiters and self.deliver is not None:
            channel, notice = next(iter(waiters.values()))
            self.deliver(channel, notice)

    def rank(self, llm_id: str, waiter: str | None) -> tuple[int, int]:
        waiters = list(self.waiting.get(llm_id, ()))
        rank = waiters.index(waiter) if waiter in waiters else len(waiters)
        return rank, len(waiters)


class MemoryRouting:
    def __init__(
        self,
        store: MemoryStore,
        stamps: MemoryStamps,
        presence: MemoryPresence,
        slots: MemorySlots,
        queue: MemoryQueue,
    ) -> None:
        self._store = store
        self._stamps = stamps
        self._presence = presence
        self._slots = slots
        self._queue = queue

    async def stamp(self, name: str) -> str:
        return self._stamps.read((name_field(name), ALL_ROWS))

    async def route(
        self,
        *,
        name: str,
        stamp: str,
        llm_id: str,
        task_id: str,
        reply: str,
        candidates: Sequence[Candidate],
        payload: bytes | None,
        waiter: str | None = None,
    ) -> Routed:
        now = await self.stamp(name)
        if now != stamp:
            return Routed(now, "stale")
        live, free_total = 0, 0.0
        best: tuple[Candidate, Presence, float, int] | None = None
        for candidate in candidates:
            presence = await self._presence.lookup(candidate.sid)
            if presence is None:
                continue
            live += 1
            if candidate.draining:
                continue
            busy = sum(self._slots.held(llm_id, candidate.sid).values())
            free = float("inf") if candidate.slots is None else candidate.slots - busy
            if free <= 0:
                continue
            free_total += free
            if best is None or free > best[2] or (free == best[2] and busy < best[3]):
                best = (candidate, presence, free, busy)
        if live == 0:
            return Routed(now, "none")
        rank, _ = self._queue.rank(llm_id, waiter)
        if best is None or rank >= free_total:
            return Routed(now, "full", position=rank)
        candidate, presence, _, _ = best
        counts = self._slots.held(llm_id, candidate.sid)
        counts[reply] = counts.get(reply, 0) + 1
        self._store.set(
            f"t:{task_id}:{candidate.token_id}",
            task_record(reply, llm_id, candidate.sid),
            TASK_TTL_SECONDS,
        )
        waiters = self._queue.waiting.get(llm_id, {})
        if waiter is not None and waiters.pop(waiter, None) is not None and free_total > 1:
            self._queue.notify_head(llm_id)
        return Routed(now, "sent", candidate, presence)

    async def join(
        self,
        *,
        llm_id: str,
        waiter: str,
        channel: str,
        notice: Mapping[str, Any],
        payload: bytes | None,
        limit: int,
        ttl: float,
    ) -> int:
        waiters = self._queue.waiting.setdefault(llm_id, {})
        if len(waiters) >= limit:
            return -1
        waiters[waiter] = (channel, notice)
        return len(waiters) - 1

    async def leave(self, *, llm_id: str, waiter: str) -> None:
        waiters = self._queue.waiting.get(llm_id, {})
        if waiters.pop(waiter, None) is not None:
            self._queue.notify_head(llm_id)
        if not waiters:
            self._queue.waiting.pop(llm_id, None)

    async def position(self, *, llm_id: str, waiter: str) -> int:
        waiters = list(self._queue.waiting.get(llm_id, ()))
        return waiters.index(waiter) if waiter in waiters else -1

    def depths_sync(self, llm_ids: list[str]) -> dict[str, int]:
        return {llm_id: len(self._queue.waiting.get(llm_id, ())) for llm_id in llm_ids}

    def on_notice(self, deliver: Callable[[str, Mapping[str, Any]], None]) -> None:
        self._queue.deliver = deliver

    async def kick(self, llm_ids: list[str]) -> None:
        for llm_id in llm_ids:
            self._queue.notify_head(llm_id)


class RedisRouting:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def stamp(self, name: str) -> str:
        values = await self._conn.client().hmget(
            self._conn.key("stamps"), [name_field(name), ALL_ROWS]
        )
        return "/".join(str(v) if v is not None else "" for v in values)

    async def route(
        self,
        *,
        name: str,
        stamp: str,
        llm_id: str,
        task_id: str,
        reply: str,
        candidates: Sequence[Candidate],
        payload: bytes | None,
        waiter: str | None = None,
    ) -> Routed:
        args: list[str | int | bytes] = [
            self._conn.prefix,
            name_field(name),
            stamp,
            reply,
            task_id,
            llm_id,
            TASK_TTL_SECONDS,
            payload or b"",
            waiter or "",
        ]
        for c in candidates:
            args += [c.sid, c.token_id, c.slots or 0, "1" if c.draining else "0"]
        answer = await self._conn.script("route")(
            keys=[self._conn.key("stamps"), self._conn.key("q", llm_id)], args=args
        )
        now, verdict = str(answer[0]), str(answer[1])
        if verdict == "sent":
            return Routed(
                now,
                "sent",
                candidates[int(answer[2]) - 1],
                decode_presence(answer[3]),
                bool(int(answer[4])),
            )
        if verdict == "full":
            return Routed(now, "full", position=int(answer[2]))
        return Routed(now, "none" if verdict == "none" else "stale")

    async def join(
        self,
        *,
        llm_id: str,
        waiter: str,
        channel: str,
        notice: Mapping[str, Any],
        payload: bytes | None,
        limit: int,
        ttl: float,
    ) -> int:
        position = await self._conn.script("queue_join")(
            args=[
                llm_id,
                waiter,
                channel,
                payload or b"",
                limit,
                max(1, int(ttl)),
                self._conn.prefix,
            ]
        )
        return int(position)

    async def leave(self, *, llm_id: str, waiter: str) -> None:
        await self._conn.script("queue_leave")(args=[llm_id, waiter, self._conn.prefix])

    async def position(self, *, llm_id: str, waiter: str) -> int:
        rank, _ = await self._conn.script("queue_rank")(
            keys=[self._conn.key("q", llm_id)], args=[waiter]
        )
        return int(rank)

    def depths_sync(self, llm_ids: list[str]) -> dict[str, int]:
        if not llm_ids:
            return {}
        values = self._conn.sync_script("queue_depths")(
            keys=[self._conn.key("q", llm_id) for llm_id in llm_ids]
        )
        return {llm_id: int(v) for llm_id, v in zip(llm_ids, values, strict=True)}

    def on_notice(self, deliver: Callable[[str, Mapping[str, Any]], None]) -> None:
        return None

    async def kick(self, llm_ids: list[str]) -> None:
        if llm_ids:
            await self._conn.script("queue_kick")(args=[self._conn.prefix, *llm_ids])

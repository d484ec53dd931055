"""Presence and liveness: which hub holds each session's control stream (``s:<session>``,
TTL 60 s) and which workers are alive (``w:<hub channel>``, TTL 1.5 s). A presence record is
believed only while its worker is alive, so a worker killed with SIGKILL stops receiving
tasks within WORKER_TTL_MS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .base import (
    PRESENCE_TTL_SECONDS,
    TASK_TTL_SECONDS,
    WORKER_TTL_MS,
    MemoryStore,
    Presence,
    RedisConn,
    decode_presence,
    encode_presence,
)


class PresenceStore(Protocol):
    async def bind(self, sid: str, channel: str, epoch: str) -> Presence | None:
        """Bind the session to this stream; the presence it replaces, if any."""

    async def refresh(self, sid: str, channel: str, epoch: str) -> bool:
        """Keep the binding alive; False once another stream holds the session."""

    async def release(self, sid: str, channel: str, epoch: str) -> bool:
        """Unbind, if this stream still holds the session."""

    async def lookup(self, sid: str) -> Presence | None:
        """Who holds the session's stream, if that worker is alive."""

    async def beat(self, channel: str, draining: bool = False) -> None:
        """This worker is alive (and, ``draining``, takes no new task for its streams)."""

    def threaded_beat(self) -> Callable[[str, bool], bool] | None:
        """A beat callable from a thread, when liveness is shared with other processes; it
        answers whether the liveness key was still there (False: the shared state was lost,
        or this worker was taken for dead)."""

    async def reassert(
        self, channel: str, streams: Sequence[tuple[str, str]], tasks: Sequence[tuple[str, str]]
    ) -> tuple[int, int]:
        """Write again, where nothing is, the presence of the streams this worker holds
        (session id, epoch) and the records of its open tasks (key suffix, record), and its
        slot counts: after Redis lost them (recovery.py). How many streams and tasks were
        written."""

    async def gone(self, channel: str) -> None:
        """This worker stops (its sessions are offline at once)."""

    async def live(self, channels: list[str]) -> set[str]:
        """Which of these workers are alive."""

    def held_sync(self, sids: list[str]) -> set[str]:
        """Which of these sessions hold a stream on a live worker (from sync code: the
        admin, the REST API)."""


class MemoryPresence:
    """One process: every worker is this process, so always alive."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def bind(self, sid: str, channel: str, epoch: str) -> Presence | None:
        previous: Presence | None = self._store.get(f"s:{sid}")
        self._store.set(f"s:{sid}", Presence(channel, epoch), PRESENCE_TTL_SECONDS)
        return previous

    async def refresh(self, sid: str, channel: str, epoch: str) -> bool:
        if self._store.get(f"s:{sid}") != Presence(channel, epoch):
            return False
        self._store.set(f"s:{sid}", Presence(channel, epoch), PRESENCE_TTL_SECONDS)
        return True

    async def release(self, sid: str, channel: str, epoch: str) -> bool:
        if self._store.get(f"s:{sid}") != Presence(channel, epoch):
            return False
        self._store.delete(f"s:{sid}")
        return True

    async def lookup(self, sid: str) -> Presence | None:
        found: Presence | None = self._store.get(f"s:{sid}")
        return found

    async def beat(self, channel: str, draining: bool = False) -> None:
        return None

    def threaded_beat(self) -> Callable[[str, bool], bool] | None:
        return None

    async def reassert(
        self, channel: str, streams: Sequence[tuple[str, str]], tasks: Sequence[tuple[str, str]]
    ) -> tuple[int, int]:
        return (0, 0)  # in one process nothing is lost without the process

    async def gone(self, channel: str) -> None:
        return None

    async def live(self, channels: list[str]) -> set[str]:
        return set(channels)

    def held_sync(self, sids: list[str]) -> set[str]:
        return {sid for sid in sids if self._store.get(f"s:{sid}") is not None}

    def peek_sync(self, sid: str) -> Presence | None:
        """Who holds the session's stream (the Fleet page, state/snapshot.py)."""
        found: Presence | None = self._store.get(f"s:{sid}")
        return found


class RedisPresence:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def bind(self, sid: str, channel: str, epoch: str) -> Presence | None:
        raw = await self._conn.client().set(
            self._conn.key("s", sid),
            encode_presence(Presence(channel, epoch)),
            ex=PRESENCE_TTL_SECONDS,
            get=True,
        )
        # With get=True, SET answers the value it replaced (or None).
        return decode_presence(raw if isinstance(raw, str | bytes) else None)

    async def refresh(self, sid: str, channel: str, epoch: str) -> bool:
        done = await self._conn.script("presence_refresh")(
            keys=[self._conn.key("s", sid)],
            args=[encode_presence(Presence(channel, epoch)), PRESENCE_TTL_SECONDS],
        )
        return bool(done)

    async def release(self, sid: str, channel: str, epoch: str) -> bool:
        done = await self._conn.script("presence_release")(
            keys=[self._conn.key("s", sid)], args=[encode_presence(Presence(channel, epoch))]
        )
        return bool(done)

    async def lookup(self, sid: str) -> Presence | None:
        raw = await self._conn.script("presence_lookup")(
            keys=[self._conn.key("s", sid)], args=[self._conn.key("w", "")]
        )
        return decode_presence(raw)

    async def beat(self, channel: str, draining: bool = False) -> None:
        value = "d" if draining else "1"
        await self._conn.client().set(self._conn.key("w", channel), value, px=WORKER_TTL_MS)

    def threaded_beat(self) -> Callable[[str, bool], bool] | None:
        def beat(channel: str, draining: bool) -> bool:
            value = "d" if draining else "1"
            key = self._conn.key("w", channel)
            before = self._conn.sync_client().set(key, value, px=WORKER_TTL_MS, get=True)
            return before is not None

        return beat

    async def reassert(
        self, channel: str, streams: Sequence[tuple[str, str]], tasks: Sequence[tuple[str, str]]
    ) -> tuple[int, int]:
        args: list[str | int] = [
            self._conn.prefix,
            channel,
            PRESENCE_TTL_SECONDS,
            TASK_TTL_SECONDS,
            len(streams),
        ]
        for sid, epoch in streams:
            args += [sid, encode_presence(Presence(channel, epoch))]
        for suffix, record in tasks:
            args += [suffix, record]
        written = await self._conn.script("reassert")(keys=[], args=args)
        return int(written[0]), int(written[1])

    async def gone(self, channel: str) -> None:
        await self._conn.client().delete(self._conn.key("w", channel))

    async def live(self, channels: list[str]) -> set[str]:
        if not channels:
            return set()
        values = await self._conn.client().mget([self._conn.key("w", c) for c in channels])
        return {c for c, v in zip(channels, values, strict=True) if v is not None}

    def held_sync(self, sids: list[str]) -> set[str]:
        if not sids:
            return set()
        flags = self._conn.sync_script("presence_held")(
            keys=[self._conn.key("s", sid) for sid in sids], args=[self._conn.key("w", "")]
        )
        return {sid for sid, flag in zip(sids, flags, strict=True) if int(flag)}

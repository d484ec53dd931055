"""The request path's round trip: a cached row's stamps and its session's live holder read
together (check), and a task opened only while both are what the cached copy was read under
(open_checked) — with Redis, one Lua script each (docs/design.md "Threads and the
database")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .base import TASK_TTL_SECONDS, Presence, RedisConn, decode_presence, encode_presence
from .presence import MemoryPresence
from .stamps import ALL_ROWS, MemoryStamps, name_field, session_field
from .tasks import MemoryTasks


@dataclass(frozen=True)
class CheckedOpen:
    """What a cached row was read under: its name and session, the stamp of both, and who
    held the session's stream."""

    name: str
    sid: str
    stamp: str
    presence: Presence


class DispatchStore(Protocol):
    async def check(self, name: str, sid: str) -> tuple[str, Presence | None]:
        """The stamps of the row ``name`` of session ``sid``, and who holds that session's
        stream (None without a session)."""

    async def open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]:
        """Open the task (and publish ``payload`` to the holder, when given) only if check()
        would still answer what ``check`` holds; check()'s answer, and whether it opened."""


class MemoryDispatch:
    def __init__(self, stamps: MemoryStamps, presence: MemoryPresence, tasks: MemoryTasks) -> None:
        self._stamps = stamps
        self._presence = presence
        self._tasks = tasks

    async def check(self, name: str, sid: str) -> tuple[str, Presence | None]:
        stamp = self._stamps.read((name_field(name), session_field(sid), ALL_ROWS))
        return stamp, (await self._presence.lookup(sid) if sid else None)

    async def open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]:
        stamp, presence = await self.check(check.name, check.sid)
        if stamp != check.stamp or presence != check.presence:
            return stamp, presence, False
        await self._tasks.put(tid, token_id, record)
        return stamp, presence, True


class RedisDispatch:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def check(self, name: str, sid: str) -> tuple[str, Presence | None]:
        key = self._conn.key
        stamp, raw = await self._conn.script("llm_check")(
            keys=[key("stamps"), key("s", sid)],
            args=[name_field(name), session_field(sid), key("w", ""), "1" if sid else "0"],
        )
        return str(stamp), decode_presence(raw or None)

    async def open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]:
        key = self._conn.key
        stamp, raw, opened = await self._conn.script("task_open_checked")(
            keys=[key("stamps"), key("s", check.sid), key("t", tid, token_id)],
            args=[
                name_field(check.name),
                session_field(check.sid),
                key("w", ""),
                check.stamp,
                encode_presence(check.presence),
                record,
                TASK_TTL_SECONDS,
                payload or b"",
            ],
        )
        return str(stamp), decode_presence(raw or None), bool(opened)

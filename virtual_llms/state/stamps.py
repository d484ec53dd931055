"""Stamps of the LLM rows (the hash ``stamps``: ``n:<name>``, ``s:<session>`` and ``*``).
Every write to a row touches the stamp of its name, of its session, or of everything, with a
value never used before; a worker's cached row stays valid while the stamps it was read
under are unchanged (rowcache.py). Touches come from sync code (services on the ORM thread,
admin, commands), so this concern's writes are sync."""

from __future__ import annotations

import itertools
from typing import Protocol

from .base import RedisConn

ALL_ROWS = "*"


def name_field(name: str) -> str:
    return f"n:{name}"


def session_field(sid: str) -> str:
    return f"s:{sid}"


class StampStore(Protocol):
    def touch(self, fields: list[str]) -> None:
        """Give these fields a new stamp."""

    def prune(self, live: set[str]) -> None:
        """Forget the stamps of rows and sessions that are gone (touches everything)."""


class MemoryStamps:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self._seq = itertools.count(1)  # next() is atomic: writers run on other threads

    def touch(self, fields: list[str]) -> None:
        value = next(self._seq)
        for f in fields:
            self.values[f] = value

    def prune(self, live: set[str]) -> None:
        for f in list(self.values):  # a snapshot: writers on other threads may add stamps
            if f not in live and f != ALL_ROWS:
                self.values.pop(f, None)
        self.touch([ALL_ROWS])

    def read(self, fields: tuple[str, ...]) -> str:
        return "/".join(str(self.values.get(f, "")) for f in fields)


class RedisStamps:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    def touch(self, fields: list[str]) -> None:
        self._conn.sync_script("stamps_touch")(
            keys=[self._conn.key("stamps"), self._conn.key("stamps", "seq")], args=fields
        )

    def prune(self, live: set[str]) -> None:
        client = self._conn.sync_client()
        key = self._conn.key("stamps")
        dead = [f for f in client.hkeys(key) if f not in live and f != ALL_ROWS]
        if dead:
            client.hdel(key, *dead)
        self.touch([ALL_ROWS])

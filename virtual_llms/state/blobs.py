"""Big messages between workers, each under a key of its own for a moment: ``spill:<id>`` →
the channel layer's bytes of one message, put by its sender and taken (read and deleted at
once) by its receiver (spill.py). A blob nobody takes (its receiver died) expires."""

from __future__ import annotations

import secrets
from typing import Protocol

from .base import MemoryStore, RedisConn

# Long enough for a receiver that is busy for a while; short enough that a blob left by a
# dead receiver does not hold memory for long.
BLOB_TTL_SECONDS = 60


class BlobStore(Protocol):
    async def put(self, payload: bytes) -> str:
        """Keep ``payload``; the id to take it with."""

    async def take(self, blob_id: str) -> bytes | None:
        """The payload, deleted as it is read; None if it expired (or was taken)."""


def new_id() -> str:
    return secrets.token_urlsafe(12)


class MemoryBlobs:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def put(self, payload: bytes) -> str:
        blob_id = new_id()
        self._store.set(f"spill:{blob_id}", payload, BLOB_TTL_SECONDS)
        return blob_id

    async def take(self, blob_id: str) -> bytes | None:
        payload: bytes | None = self._store.get(f"spill:{blob_id}")
        self._store.delete(f"spill:{blob_id}")
        return payload


class RedisBlobs:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def put(self, payload: bytes) -> str:
        blob_id = new_id()
        await self._conn.raw_client().set(
            self._conn.key("spill", blob_id), payload, ex=BLOB_TTL_SECONDS
        )
        return blob_id

    async def take(self, blob_id: str) -> bytes | None:
        payload = await self._conn.raw_client().getdel(self._conn.key("spill", blob_id))
        return payload if isinstance(payload, bytes) else None  # a bytes client

"""Leases: ``l:<key>`` → an epoch (from the counter ``le:<key>``) and its holder, with a TTL
the holder renews. One holder at a time across all workers (the wake of a hibernating LLM);
a holder killed with SIGKILL loses the lease when its TTL runs out."""

from __future__ import annotations

from typing import Protocol

from .base import MemoryStore, RedisConn


class LeaseStore(Protocol):
    async def acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        """The new lease's epoch, or None while someone else holds it."""

    async def refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        """Renew the lease; False once it was lost (expired, or another epoch's)."""

    async def release(self, key: str, epoch: int) -> None:
        """Give the lease up, if it is still this epoch's."""


class MemoryLeases:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._epochs: dict[str, int] = {}

    async def acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        if self._store.get(f"l:{key}") is not None:
            return None
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        self._store.set(f"l:{key}", epoch, ttl_ms / 1000)
        return epoch

    async def refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        if self._store.get(f"l:{key}") != epoch:
            return False
        self._store.set(f"l:{key}", epoch, ttl_ms / 1000)
        return True

    async def release(self, key: str, epoch: int) -> None:
        if self._store.get(f"l:{key}") == epoch:
            self._store.delete(f"l:{key}")


class RedisLeases:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    async def acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        epoch = await self._conn.script("lease_acquire")(
            keys=[self._conn.key("l", key), self._conn.key("le", key)], args=[holder, ttl_ms]
        )
        return int(epoch) if epoch is not None else None

    async def refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        done = await self._conn.script("lease_refresh")(
            keys=[self._conn.key("l", key)], args=[epoch, ttl_ms]
        )
        return bool(done)

    async def release(self, key: str, epoch: int) -> None:
        await self._conn.script("lease_release")(keys=[self._conn.key("l", key)], args=[epoch])

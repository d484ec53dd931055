"""Leases: ``l:<key>`` → an epoch (from the counter ``le:<key>``) and its holder, with a TTL
the holder renews. One holder at a time across all workers (the wake of a hibernating LLM);
a holder killed with SIGKILL loses the lease when its TTL runs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from .base import MemoryStore, RedisConn


@dataclass(frozen=True)
class Joined:
    """join()'s answer: a wake already running (``epoch``: wait for its outcome), an outcome
    to take as it is (``record``), or the lease taken (``epoch``: lead the wake)."""

    kind: Literal["running", "outcome", "lead"]
    epoch: int = 0
    record: str = ""


class LeaseStore(Protocol):
    async def acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        """The new lease's epoch, or None while someone else holds it."""

    async def refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        """Renew the lease; False once it was lost (expired, or another epoch's)."""

    async def release(self, key: str, epoch: int) -> None:
        """Give the lease up, if it is still this epoch's."""

    async def join(self, key: str, holder: str, ttl_ms: int, joined: int, since_ms: int) -> Joined:
        """Join the lease's current epoch, or learn an outcome (that of epoch ``joined`` or
        later, for a caller that joined it before; a failure decided at or after
        ``since_ms``, when the caller's request arrived; a failure, while it is remembered
        for everyone), or take the lease (lua/wake_join.lua)."""

    async def end(
        self, key: str, epoch: int, record: str, keep_seconds: int, failure_seconds: int
    ) -> None:
        """Release the lease of ``epoch`` and, in the same step, record its outcome for
        ``keep_seconds``, and, for everyone, for ``failure_seconds`` (0: not)."""


class MemoryLeases:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._epochs: dict[str, int] = {}
        self._since: dict[str, int] = {}  # when each wake's leader's request arrived (ms)

    def peek_sync(self, key: str) -> str:
        """The lease's value as Redis keeps it ("<epoch> <holder> <since ms>"), "" when
        nobody holds it (the Fleet page, state/snapshot.py)."""
        epoch = self._store.get(f"l:{key}")
        return "" if epoch is None else f"{epoch} local {self._since.get(key, '-')}"

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

    async def join(self, key: str, holder: str, ttl_ms: int, joined: int, since_ms: int) -> Joined:
        running = self._store.get(f"l:{key}")
        if running is not None:
            return Joined("running", epoch=running)
        record: str | None = self._store.get(f"lo:{key}")
        if record is not None:
            epoch, ok, _status, _code, decided = record.split(" ", 5)[:5]
            if joined > 0 and int(epoch) >= joined:
                return Joined("outcome", record=record)
            if ok == "0" and int(decided) >= since_ms:
                return Joined("outcome", record=record)
        failed: str | None = self._store.get(f"lf:{key}")
        if failed is not None:
            return Joined("outcome", record=failed)
        epoch_taken = await self.acquire(key, holder, ttl_ms)
        assert epoch_taken is not None  # one loop, nothing ran in between
        self._since[key] = since_ms
        return Joined("lead", epoch=epoch_taken)

    async def end(
        self, key: str, epoch: int, record: str, keep_seconds: int, failure_seconds: int
    ) -> None:
        await self.release(key, epoch)
        self._store.set(f"lo:{key}", f"{epoch} {record}", keep_seconds)
        if failure_seconds > 0:
            self._store.set(f"lf:{key}", f"{epoch} {record}", failure_seconds)


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

    async def join(self, key: str, holder: str, ttl_ms: int, joined: int, since_ms: int) -> Joined:
        k = self._conn.key
        kind, value = await self._conn.script("wake_join")(
            keys=[k("l", key), k("le", key), k("lo", key), k("lf", key)],
            args=[holder, ttl_ms, joined, since_ms],
        )
        if kind == "outcome":
            return Joined("outcome", record=str(value))
        return Joined("running" if kind == "running" else "lead", epoch=int(value))

    async def end(
        self, key: str, epoch: int, record: str, keep_seconds: int, failure_seconds: int
    ) -> None:
        k = self._conn.key
        await self._conn.script("wake_end")(
            keys=[k("l", key), k("lo", key), k("lf", key)],
            args=[epoch, record, keep_seconds, failure_seconds],
        )

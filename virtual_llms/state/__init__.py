"""State every worker must agree on, with TTLs, one concern per module: presence and
liveness (presence.py), open tasks (tasks.py), row stamps (stamps.py), leases (leases.py),
tasks in flight per backend (slots.py), client limits' windows (limits.py), and routing
with the per-LLM queue (routing.py): the request path's round trip, and big messages between
workers (blobs.py); snapshot.py reads the whole fleet at once (/metrics).

With ``REDIS_URL`` it lives in Redis (Lua scripts in ``lua/``); without, in this process's
memory (the embedded, one-process broker). Both implementations of each concern have the
same semantics and are tested alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from .base import (
    LOOP_STALL_SECONDS,
    PRESENCE_TTL_SECONDS,
    TASK_TTL_SECONDS,
    WORKER_BEAT_SECONDS,
    WORKER_TTL_MS,
    MemoryStore,
    Presence,
    RedisConn,
)
from .blobs import BlobStore, MemoryBlobs, RedisBlobs
from .leases import LeaseStore, MemoryLeases, RedisLeases
from .limits import LimitStore, MemoryLimits, RedisLimits, Verdict
from .presence import MemoryPresence, PresenceStore, RedisPresence
from .routing import Candidate, MemoryQueue, MemoryRouting, RedisRouting, Routed, RoutingStore
from .slots import MemorySlots, RedisSlots, SlotStore
from .stamps import ALL_ROWS, MemoryStamps, RedisStamps, StampStore, name_field, session_field
from .tasks import MemoryTasks, RedisTasks, TaskStore

__all__ = [
    "ALL_ROWS",
    "LOOP_STALL_SECONDS",
    "PRESENCE_TTL_SECONDS",
    "TASK_TTL_SECONDS",
    "WORKER_BEAT_SECONDS",
    "WORKER_TTL_MS",
    "Candidate",
    "Presence",
    "Routed",
    "SharedState",
    "Verdict",
    "current_state",
    "get_state",
    "name_field",
    "reset_state",
    "session_field",
]


@dataclass(frozen=True)
class SharedState:
    presence: PresenceStore
    tasks: TaskStore
    stamps: StampStore
    leases: LeaseStore
    routing: RoutingStore
    slots: SlotStore
    limits: LimitStore
    blobs: BlobStore
    # With Redis: its connections (closed per loop by aclose, and at reset).
    conn: RedisConn | None = None

    async def ping(self) -> None:
        """Reach the shared state (health.py); raises when it is away."""
        if self.conn is not None:
            await self.conn.client().ping()

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        if self.conn is not None:
            await self.conn.aclose()


def _memory() -> SharedState:
    store = MemoryStore()
    presence, stamps, queue = MemoryPresence(store), MemoryStamps(), MemoryQueue()
    slots = MemorySlots(store)
    return SharedState(
        presence=presence,
        tasks=MemoryTasks(store, slots, queue),
        stamps=stamps,
        leases=MemoryLeases(store),
        routing=MemoryRouting(store, stamps, presence, slots, queue),
        slots=slots,
        limits=MemoryLimits(),
        blobs=MemoryBlobs(store),
    )


def _redis(url: str, prefix: str) -> SharedState:
    conn = RedisConn(url, prefix)
    return SharedState(
        presence=RedisPresence(conn),
        tasks=RedisTasks(conn),
        stamps=RedisStamps(conn),
        leases=RedisLeases(conn),
        routing=RedisRouting(conn),
        slots=RedisSlots(conn),
        limits=RedisLimits(conn),
        blobs=RedisBlobs(conn),
        conn=conn,
    )


_state: SharedState | None = None


def get_state() -> SharedState:
    global _state
    if _state is None:
        url = settings.REDIS_URL
        _state = _redis(url, settings.MCPD_REDIS_PREFIX) if url else _memory()
    return _state


def current_state() -> SharedState | None:
    """The process's state object, if one was made."""
    return _state


def reset_state() -> None:
    """Forget the process's state object (tests that switch settings or event loops)."""
    global _state
    if _state is not None and _state.conn is not None:
        _state.conn.close_sync()
    _state = None

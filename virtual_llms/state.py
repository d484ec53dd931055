"""State that every worker must agree on, with a TTL: who holds which session's stream,
which workers are alive, which tasks are open (and for which token), and wake leases.

With ``REDIS_URL`` it lives in Redis; without, in this process's memory (the embedded,
one-process broker). Both implementations have the same semantics and are tested alike.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

# A worker refreshes its liveness key every WORKER_BEAT_SECONDS; a worker that has not for
# WORKER_TTL_MS is dead (kill -9): requests for its sessions then get 503 within 2 s.
WORKER_BEAT_SECONDS = 0.3
WORKER_TTL_MS = 1500
# The beat comes from a thread, so that a busy event loop (thousands of streams on a full
# machine fell 1.5-5 s behind) is not taken for a dead worker; but only while the loop
# shows progress: one stuck for this long is let go.
LOOP_STALL_SECONDS = 10.0
# A control stream refreshes its presence record with every ping (15 s); a record outlives
# a few missed refreshes, and a dead worker's records are ignored via its liveness key.
PRESENCE_TTL_SECONDS = 60
# An open task's record lives at most this long; the requester deletes it when it ends.
TASK_TTL_SECONDS = 3600
# Redis connections per process for the shared state, and how long a caller waits for one.
REDIS_POOL_SIZE = 64
REDIS_POOL_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Presence:
    channel: str
    epoch: str


@dataclass(frozen=True)
class CheckedOpen:
    """What a cached row was read under (state.task_open_checked): its name and session,
    the stamp of both, and who held the session's stream."""

    name: str
    sid: str
    stamp: str
    presence: Presence


class SharedState(Protocol):
    async def bind_session(self, sid: str, channel: str, epoch: str) -> Presence | None: ...
    async def refresh_session(self, sid: str, channel: str, epoch: str) -> bool: ...
    async def release_session(self, sid: str, channel: str, epoch: str) -> bool: ...
    async def lookup_session(self, sid: str) -> Presence | None: ...
    async def worker_beat(self, channel: str) -> None: ...
    async def worker_gone(self, channel: str) -> None: ...
    async def live_workers(self, channels: list[str]) -> set[str]: ...
    async def task_put(self, tid: str, token_id: int, record: str) -> None: ...
    async def task_open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes
    ) -> None: ...
    async def task_get(
        self, tid: str, token_id: int, payload: bytes | None = None
    ) -> str | None: ...
    async def task_take(
        self, tid: str, token_id: int, payload: bytes | None = None
    ) -> str | None: ...
    async def lease_acquire(self, key: str, holder: str, ttl_ms: int) -> int | None: ...
    async def lease_refresh(self, key: str, epoch: int, ttl_ms: int) -> bool: ...
    async def lease_release(self, key: str, epoch: int) -> None: ...
    async def llm_check(self, name: str, sid: str) -> tuple[str, Presence | None]: ...
    async def task_open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]: ...
    def llm_touch(self, fields: list[str]) -> None: ...
    def llm_prune(self, live: set[str]) -> None: ...
    async def aclose(self) -> None: ...

    # This process's cache of LLM rows, validated against the stamps (relay.llm_lookup).
    rows: dict[str, Any]


# Stamps of the LLM rows. Every write to a row touches the stamp of its name, of its session,
# or of everything ("*"), with a value never used before; a worker's cached row stays valid
# while the three stamps it was read under are unchanged (relay.llm_lookup).
ALL_ROWS = "*"


def name_field(name: str) -> str:
    return f"n:{name}"


def session_field(sid: str) -> str:
    return f"s:{sid}"


def _encode(p: Presence) -> str:
    return f"{p.channel} {p.epoch}"


def _decode(raw: str | bytes | None) -> Presence | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    channel, _, epoch = text.partition(" ")
    return Presence(channel, epoch)


class MemoryState:
    """The one-process implementation. Every worker is this process, so always alive."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[Any, float]] = {}
        self._epochs: dict[str, int] = {}
        self._stamps: dict[str, int] = {}
        self._seq = itertools.count(1)  # next() is atomic: writers run on other threads
        self.rows: dict[str, Any] = {}

    def _get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires < time.monotonic():
            del self._data[key]
            return None
        return value

    def _set(self, key: str, value: Any, ttl: float) -> None:
        self._data[key] = (value, time.monotonic() + ttl)

    async def bind_session(self, sid: str, channel: str, epoch: str) -> Presence | None:
        previous = self._get(f"s:{sid}")
        self._set(f"s:{sid}", Presence(channel, epoch), PRESENCE_TTL_SECONDS)
        return previous

    async def refresh_session(self, sid: str, channel: str, epoch: str) -> bool:
        if self._get(f"s:{sid}") != Presence(channel, epoch):
            return False
        self._set(f"s:{sid}", Presence(channel, epoch), PRESENCE_TTL_SECONDS)
        return True

    async def release_session(self, sid: str, channel: str, epoch: str) -> bool:
        if self._get(f"s:{sid}") != Presence(channel, epoch):
            return False
        del self._data[f"s:{sid}"]
        return True

    async def lookup_session(self, sid: str) -> Presence | None:
        return self._get(f"s:{sid}")

    async def worker_beat(self, channel: str) -> None:
        return None

    async def worker_gone(self, channel: str) -> None:
        return None

    async def live_workers(self, channels: list[str]) -> set[str]:
        return set(channels)

    async def task_put(self, tid: str, token_id: int, record: str) -> None:
        self._set(f"t:{tid}:{token_id}", record, TASK_TTL_SECONDS)

    async def task_open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes
    ) -> None:
        raise NotImplementedError("no Redis to publish to: events.direct_payload is None")

    async def task_get(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        assert payload is None, "no Redis to publish to"
        value = self._get(f"t:{tid}:{token_id}")
        if value is not None:
            self._set(f"t:{tid}:{token_id}", value, TASK_TTL_SECONDS)
        return value

    async def task_take(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        assert payload is None, "no Redis to publish to"
        value = self._get(f"t:{tid}:{token_id}")
        if value is not None:
            del self._data[f"t:{tid}:{token_id}"]
        return value

    async def lease_acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        if self._get(f"l:{key}") is not None:
            return None
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        self._set(f"l:{key}", epoch, ttl_ms / 1000)
        return epoch

    async def lease_refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        if self._get(f"l:{key}") != epoch:
            return False
        self._set(f"l:{key}", epoch, ttl_ms / 1000)
        return True

    async def lease_release(self, key: str, epoch: int) -> None:
        if self._get(f"l:{key}") == epoch:
            del self._data[f"l:{key}"]

    async def llm_check(self, name: str, sid: str) -> tuple[str, Presence | None]:
        stamps = self._stamps
        fields = (name_field(name), session_field(sid), ALL_ROWS)
        stamp = "/".join(str(stamps.get(f, "")) for f in fields)
        return stamp, (self._get(f"s:{sid}") if sid else None)

    async def task_open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]:
        assert payload is None, "no Redis to publish to"
        stamp, presence = await self.llm_check(check.name, check.sid)
        if stamp != check.stamp or presence != check.presence:
            return stamp, presence, False
        await self.task_put(tid, token_id, record)
        return stamp, presence, True

    def llm_touch(self, fields: list[str]) -> None:
        value = next(self._seq)
        for f in fields:
            self._stamps[f] = value

    def llm_prune(self, live: set[str]) -> None:
        for f in list(self._stamps):  # a snapshot: writers on other threads may add stamps
            if f not in live and f != ALL_ROWS:
                self._stamps.pop(f, None)
        self.llm_touch([ALL_ROWS])

    async def aclose(self) -> None:
        return None


# Compare-and-set scripts: each runs atomically inside Redis.
_LOOKUP = """
local p = redis.call('GET', KEYS[1])
if not p then return nil end
local ch = string.match(p, '^(%S+)')
if redis.call('EXISTS', ARGV[1] .. ch) == 1 then return p end
return nil
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_LEASE_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return nil end
local epoch = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 86400)
redis.call('SET', KEYS[1], epoch .. ' ' .. ARGV[1], 'PX', ARGV[2])
return epoch
"""
# An open task's record starts with the requester's hub channel. If that worker died, the
# record is dropped and the publisher's answer refused (404), as for a client that left.
# Else the answer (ARGV[4], the channel layer's bytes, events.direct_payload) is published
# to that channel, in the same round trip.
_TASK_READ = """
local v
if ARGV[2] == '1' then v = redis.call('GETDEL', KEYS[1])
else v = redis.call('GETEX', KEYS[1], 'EX', ARGV[3]) end
if not v then return nil end
local reply = string.match(v, '^(%S+)')
if redis.call('EXISTS', ARGV[1] .. reply) == 0 then
  redis.call('DEL', KEYS[1])
  return nil
end
if ARGV[4] ~= '' then redis.call('PUBLISH', reply, ARGV[4]) end
return v
"""
# A new task's record, and its frame published to the hub holding the stream.
_TASK_OPEN = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
_LEASE_REFRESH = """
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_LEASE_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(%d+)') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A row's three stamps (name, session, everything) and, in the same round trip, who holds
# the session's stream (as _LOOKUP).
_LLM_CHECK = """
local st = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], '*')
local stamp = (st[1] or '') .. '/' .. (st[2] or '') .. '/' .. (st[3] or '')
local p = false
if ARGV[4] == '1' then
  p = redis.call('GET', KEYS[2])
  if p and redis.call('EXISTS', ARGV[3] .. string.match(p, '^(%S+)')) == 0 then p = false end
end
return {stamp, p}
"""
# _LLM_CHECK and _TASK_OPEN in one round trip, for a row cached here: the task is opened
# (and, unless the stream is held by the requester's own hub, its frame published to the
# holder) only while the row's stamps and the session's live holder are those the cached
# copy was read under (ARGV[4], ARGV[5]). Either way the stamps and the holder come back.
_TASK_OPEN_CHECKED = """
local st = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2], '*')
local stamp = (st[1] or '') .. '/' .. (st[2] or '') .. '/' .. (st[3] or '')
local p = redis.call('GET', KEYS[2])
local ch = p and string.match(p, '^(%S+)')
if p and redis.call('EXISTS', ARGV[3] .. ch) == 0 then p = false end
if stamp ~= ARGV[4] or p ~= ARGV[5] then return {stamp, p, 0} end
redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7])
if ARGV[8] ~= '' then redis.call('PUBLISH', ch, ARGV[8]) end
return {stamp, p, 1}
"""
_LLM_TOUCH = """
local s = redis.call('INCR', KEYS[2])
for i = 1, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], s) end
return s
"""

_SCRIPTS = {
    "lookup": _LOOKUP,
    "refresh": _REFRESH,
    "release": _RELEASE,
    "task_read": _TASK_READ,
    "lease_acquire": _LEASE_ACQUIRE,
    "lease_refresh": _LEASE_REFRESH,
    "lease_release": _LEASE_RELEASE,
    "llm_check": _LLM_CHECK,
    "task_open": _TASK_OPEN,
    "task_open_checked": _TASK_OPEN_CHECKED,
}


class RedisState:
    """The shared implementation. One client per event loop (redis-py's are loop-bound)."""

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self.prefix = f"{prefix}:"
        # Per event loop: the client and its registered Lua scripts.
        self._clients: dict[asyncio.AbstractEventLoop, tuple[Any, dict[str, Any]]] = {}
        # Writes to rows are sync code (services on the ORM thread, admin, commands): they
        # touch stamps with a sync client, made on first use.
        self._sync: tuple[Any, Any] | None = None
        self._sync_lock = threading.Lock()
        self.rows: dict[str, Any] = {}

    def _conn(self) -> tuple[Any, dict[str, Any]]:
        import redis.asyncio as redis_asyncio

        loop = asyncio.get_running_loop()
        conn = self._clients.get(loop)
        if conn is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            # A bounded pool that waits for a free connection: a burst of requests queues
            # here for a moment instead of failing (redis-py's default pool raises past 100).
            pool = redis_asyncio.BlockingConnectionPool.from_url(
                self._url,
                max_connections=REDIS_POOL_SIZE,
                timeout=REDIS_POOL_WAIT_SECONDS,
                decode_responses=True,
            )
            client = redis_asyncio.Redis(connection_pool=pool)
            scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
            conn = self._clients[loop] = (client, scripts)
        return conn

    def _r(self) -> Any:
        return self._conn()[0]

    def _script(self, name: str) -> Any:
        return self._conn()[1][name]

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    async def bind_session(self, sid: str, channel: str, epoch: str) -> Presence | None:
        raw = await self._r().set(
            self._k("s", sid), _encode(Presence(channel, epoch)), ex=PRESENCE_TTL_SECONDS, get=True
        )
        return _decode(raw)

    async def refresh_session(self, sid: str, channel: str, epoch: str) -> bool:
        value = _encode(Presence(channel, epoch))
        done = await self._script("refresh")(
            keys=[self._k("s", sid)], args=[value, PRESENCE_TTL_SECONDS]
        )
        return bool(done)

    async def release_session(self, sid: str, channel: str, epoch: str) -> bool:
        value = _encode(Presence(channel, epoch))
        return bool(await self._script("release")(keys=[self._k("s", sid)], args=[value]))

    async def lookup_session(self, sid: str) -> Presence | None:
        raw = await self._script("lookup")(keys=[self._k("s", sid)], args=[self._k("w", "")])
        return _decode(raw)

    async def worker_beat(self, channel: str) -> None:
        await self._r().set(self._k("w", channel), "1", px=WORKER_TTL_MS)

    def worker_beat_sync(self, channel: str) -> None:
        """:meth:`worker_beat` from a thread (the hub's beat thread)."""
        self._sync_client()[0].set(self._k("w", channel), "1", px=WORKER_TTL_MS)

    async def worker_gone(self, channel: str) -> None:
        await self._r().delete(self._k("w", channel))

    async def live_workers(self, channels: list[str]) -> set[str]:
        if not channels:
            return set()
        values = await self._r().mget([self._k("w", c) for c in channels])
        return {c for c, v in zip(channels, values, strict=True) if v is not None}

    async def task_put(self, tid: str, token_id: int, record: str) -> None:
        await self._r().set(self._k("t", tid, token_id), record, ex=TASK_TTL_SECONDS)

    async def task_open(
        self, tid: str, token_id: int, record: str, channel: str, payload: bytes
    ) -> None:
        """task_put, and ``payload`` published to ``channel``, in one round trip."""
        await self._script("task_open")(
            keys=[self._k("t", tid, token_id)], args=[record, TASK_TTL_SECONDS, channel, payload]
        )

    async def _task_read(
        self, tid: str, token_id: int, take: bool, payload: bytes | None
    ) -> str | None:
        value = await self._script("task_read")(
            keys=[self._k("t", tid, token_id)],
            args=[self._k("w", ""), "1" if take else "0", TASK_TTL_SECONDS, payload or b""],
        )
        return value if value is None else str(value)

    async def task_get(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        """The open task's record (its TTL renewed), if its requester is alive; ``payload``,
        if given, is published to the requester's hub."""
        return await self._task_read(tid, token_id, False, payload)

    async def task_take(self, tid: str, token_id: int, payload: bytes | None = None) -> str | None:
        """Take the open task's record: whoever gets it ends the task, once. ``payload``, if
        given, is published to the requester's hub."""
        return await self._task_read(tid, token_id, True, payload)

    async def lease_acquire(self, key: str, holder: str, ttl_ms: int) -> int | None:
        epoch = await self._script("lease_acquire")(
            keys=[self._k("l", key), self._k("le", key)], args=[holder, ttl_ms]
        )
        return int(epoch) if epoch is not None else None

    async def lease_refresh(self, key: str, epoch: int, ttl_ms: int) -> bool:
        return bool(
            await self._script("lease_refresh")(keys=[self._k("l", key)], args=[epoch, ttl_ms])
        )

    async def lease_release(self, key: str, epoch: int) -> None:
        await self._script("lease_release")(keys=[self._k("l", key)], args=[epoch])

    async def llm_check(self, name: str, sid: str) -> tuple[str, Presence | None]:
        stamp, raw = await self._script("llm_check")(
            keys=[self._k("stamps"), self._k("s", sid)],
            args=[name_field(name), session_field(sid), self._k("w", ""), "1" if sid else "0"],
        )
        return str(stamp), _decode(raw or None)

    async def task_open_checked(
        self, check: CheckedOpen, tid: str, token_id: int, record: str, payload: bytes | None
    ) -> tuple[str, Presence | None, bool]:
        """task_open (task_put when ``payload`` is None), only if llm_check would still give
        what ``check`` holds; and what it gives, in the same round trip."""
        stamp, raw, opened = await self._script("task_open_checked")(
            keys=[self._k("stamps"), self._k("s", check.sid), self._k("t", tid, token_id)],
            args=[
                name_field(check.name),
                session_field(check.sid),
                self._k("w", ""),
                check.stamp,
                _encode(check.presence),
                record,
                TASK_TTL_SECONDS,
                payload or b"",
            ],
        )
        return str(stamp), _decode(raw or None), bool(opened)

    def _sync_client(self) -> tuple[Any, Any]:
        with self._sync_lock:
            if self._sync is None:
                import redis

                client = redis.Redis.from_url(self._url, decode_responses=True)
                self._sync = (client, client.register_script(_LLM_TOUCH))
            return self._sync

    def llm_touch(self, fields: list[str]) -> None:
        touch = self._sync_client()[1]
        touch(keys=[self._k("stamps"), self._k("stamps", "seq")], args=fields)

    def llm_prune(self, live: set[str]) -> None:
        client = self._sync_client()[0]
        dead = [f for f in client.hkeys(self._k("stamps")) if f not in live and f != ALL_ROWS]
        if dead:
            client.hdel(self._k("stamps"), *dead)
        self.llm_touch([ALL_ROWS])

    def close_sync(self) -> None:
        with self._sync_lock:
            if self._sync is not None:
                self._sync[0].close()
                self._sync = None

    async def aclose(self) -> None:
        """Close this event loop's client."""
        conn = self._clients.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn[0].aclose(close_connection_pool=True)


_state: SharedState | None = None


def get_state() -> SharedState:
    global _state
    if _state is None:
        _state = (
            RedisState(settings.REDIS_URL, settings.MCPD_REDIS_PREFIX)
            if settings.REDIS_URL
            else MemoryState()
        )
    return _state


def current_state() -> SharedState | None:
    """The process's state object, if one was made."""
    return _state


def reset_state() -> None:
    """Forget the process's state object (tests that switch settings or event loops)."""
    global _state
    if isinstance(_state, RedisState):
        _state.close_sync()
    _state = None

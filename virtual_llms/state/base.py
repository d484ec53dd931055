"""What every concern of the shared state builds on: the lifetimes, the records' types, the
in-memory store with TTLs, and the Redis connection with its Lua scripts (loaded once from
``lua/``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..loopcache import PerLoop

if TYPE_CHECKING:
    import redis
    import redis.asyncio as redis_asyncio
    from redis.commands.core import AsyncScript, Script

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
REDIS_POOL_WAIT_SECONDS = 5.0
# The bytes client's (state/blobs.py): a few big values at a time.
RAW_POOL_SIZE = 8
# Every command's bound: a stalled Redis (paused, or a network that drops packets) fails a
# request with 503 after this long instead of holding it for ever (redis-py's default), and
# a connection attempt fails after the second bound.
REDIS_TIMEOUT_SECONDS = 2.0
REDIS_CONNECT_TIMEOUT_SECONDS = 1.0


def _reconnect_once(sync: bool = False) -> Any:
    """A pooled connection that Redis closed (it restarted) fails its next command with a
    ConnectionError: reconnect and send it once more, instead of refusing one request per
    pooled connection after every restart. Only then: not on a timeout (a stalled Redis
    may have run the command; the caller's deadline answers 503 instead)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if sync:
        from redis.retry import Retry
    else:
        from redis.asyncio.retry import Retry  # type: ignore[assignment]
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


@dataclass(frozen=True)
class Presence:
    """Who holds a session's control stream: the hub's channel and the stream's epoch."""

    channel: str
    epoch: str


def encode_presence(p: Presence) -> str:
    return f"{p.channel} {p.epoch}"


def decode_presence(raw: str | bytes | None) -> Presence | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    channel, _, epoch = text.partition(" ")
    return Presence(channel, epoch)


class MemoryStore:
    """The one-process broker's keys: values with a TTL, in a dict."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[Any, float]] = {}

    def get(self, key: str) -> Any:
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires < time.monotonic():
            del self.data[key]
            return None
        return value

    def set(self, key: str, value: Any, ttl: float) -> None:
        self.data[key] = (value, time.monotonic() + ttl)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def _load_scripts() -> dict[str, str]:
    """Every script of lua/, read once at import. A script whose first line is
    ``-- uses: lib/<file>.lua`` gets that file's functions put before it (Lua has no
    imports), so helpers several scripts share are written once."""
    folder = resources.files(__package__).joinpath("lua")
    scripts = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".lua"):
            continue
        source = entry.read_text()
        first = source.split("\n", 1)[0]
        if first.startswith("-- uses: "):
            source = folder.joinpath(first.removeprefix("-- uses: ")).read_text() + source
        scripts[entry.name.removesuffix(".lua")] = source
    return scripts


# Registered per client: redis-py sends the SHA with EVALSHA, the source only if Redis does
# not know it yet.
SCRIPTS: dict[str, str] = _load_scripts()


class RedisConn:
    """The shared state's Redis clients: one async client per event loop (redis-py's are
    loop-bound) with the scripts registered on it, and one sync client for writers that run
    in threads (services on the ORM thread, admin, commands, the hub's beat thread)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = f"{prefix}:"
        self._clients: PerLoop[tuple[redis_asyncio.Redis, dict[str, AsyncScript]]] = PerLoop()
        self._raw: PerLoop[redis_asyncio.Redis] = PerLoop()
        self._sync: tuple[redis.Redis, dict[str, Script]] | None = None
        self._sync_lock = threading.Lock()

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _make(self) -> tuple[redis_asyncio.Redis, dict[str, AsyncScript]]:
        import redis.asyncio as redis_asyncio

        # A bounded pool that waits for a free connection: a burst of requests queues here
        # for a moment instead of failing (redis-py's default pool raises past 100).
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            self.url,
            max_connections=REDIS_POOL_SIZE,
            timeout=REDIS_POOL_WAIT_SECONDS,
            decode_responses=True,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
            retry=_reconnect_once(),
        )
        client = redis_asyncio.Redis(connection_pool=pool)
        return client, {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def client(self) -> redis_asyncio.Redis:
        return self._clients.get(self._make)[0]

    def _make_raw(self) -> redis_asyncio.Redis:
        import redis.asyncio as redis_asyncio

        pool = redis_asyncio.BlockingConnectionPool.from_url(
            self.url,
            max_connections=RAW_POOL_SIZE,
            timeout=REDIS_POOL_WAIT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
            retry=_reconnect_once(),
        )
        return redis_asyncio.Redis(connection_pool=pool)

    def raw_client(self) -> redis_asyncio.Redis:
        """This loop's client that answers bytes as they are (the channel layer's messages
        stored under keys of their own: spill.py); client() decodes every answer as text."""
        return self._raw.get(self._make_raw)

    def script(self, name: str) -> AsyncScript:
        return self._clients.get(self._make)[1][name]

    def sync_client(self) -> redis.Redis:
        return self._sync_pair()[0]

    def sync_script(self, name: str) -> Script:
        return self._sync_pair()[1][name]

    def _sync_pair(self) -> tuple[redis.Redis, dict[str, Script]]:
        with self._sync_lock:
            if self._sync is None:
                import redis

                client = redis.Redis.from_url(
                    self.url,
                    decode_responses=True,
                    socket_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
                    retry=_reconnect_once(sync=True),
                )
                self._sync = (
                    client,
                    {name: client.register_script(src) for name, src in SCRIPTS.items()},
                )
            return self._sync

    def close_sync(self) -> None:
        with self._sync_lock:
            if self._sync is not None:
                self._sync[0].close()
                self._sync = None

    async def aclose(self) -> None:
        """Close this event loop's clients."""
        conn = self._clients.pop()
        if conn is not None:
            await conn[0].aclose(close_connection_pool=True)
        raw = self._raw.pop()
        if raw is not None:
            await raw.aclose(close_connection_pool=True)

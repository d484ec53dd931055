"""What the broker relies on in channels and channels-redis beyond their public API.

- **The pub/sub layer's wire format.** ``RedisPubSubChannelLayer.send(channel, message)``
  PUBLISHes ``serialize(message)`` (plain msgpack: no prefix, no encryption unless
  configured) to the Redis channel named ``channel`` on its one host. The broker's Redis
  scripts publish those same bytes themselves, in the round trip that writes a task's state
  (state/tasks.py, state/routing.py): one round trip instead of two, and off the layer's
  one publishing connection. :func:`pubsub_payload` gives the bytes, or None for any other
  layer (the caller then uses ``send``). Can go if channels-redis gains a way to send from
  a script, or if the broker publishes with its own client.
- **Closing the layer's connections per event loop.** Only the pub/sub layer has per-loop
  connections to close (its ``flush``, recognised by its ``_get_layer``).
- **Hearing of a lost subscription** (:class:`SubscriptionWatch`): a connect callback on
  the layer's subscription connections.
- **A consumer's dispatch.** channels' ``AsyncConsumer.dispatch`` runs
  ``close_old_connections()`` on the sync thread before every message: for the control
  socket that is a thread hop per result or chunk frame (a fifth of its CPU under load).
  :class:`NoDatabaseCheckDispatch` dispatches without it; the one frame that touches the
  database (heartbeat) runs on the shared sync thread, whose connection the API handler's
  upkeep checks every second (runtime/django_asgi.py; the socket starts it too). Can go if
  channels makes the check optional.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from channels.consumer import get_handler_name

from .redis_parser import layer_address

PUBSUB_LAYER = "channels_redis.pubsub.RedisPubSubChannelLayer"


def pubsub_payload(
    layer: Any, config: Mapping[str, Any], redis_url: str, message: Mapping[str, Any]
) -> bytes | None:
    """The bytes ``layer.send(channel, message)`` would PUBLISH, when ``layer`` (configured
    by ``config``, settings.CHANNEL_LAYERS["default"]) is the pub/sub layer on the one host
    ``redis_url``; else None."""
    if config["BACKEND"] != PUBSUB_LAYER:
        return None
    hosts = [layer_address(host) for host in config["CONFIG"]["hosts"]]
    if hosts != [redis_url]:
        return None
    payload: bytes = layer.serialize(message)
    return payload


async def close(layer: Any) -> None:
    """Close this event loop's connections of ``layer`` (the pub/sub layer's are per loop)."""
    if hasattr(layer, "_get_layer"):
        await layer.flush()


class NoDatabaseCheckDispatch:
    """A mixin for an ``AsyncConsumer``: channels' dispatch without its database check."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


def _shards(layer: Any) -> list[Any]:
    """The pub/sub layer's per-loop shard connections (RedisSingleShardConnection), or []."""
    if not hasattr(layer, "_get_layer"):
        return []
    return list(getattr(layer._get_layer(), "_shards", []))


async def resubscribe_dropped(layer: Any, *, force: bool = False) -> int:
    """Re-open the pub/sub layer's subscriptions whose connection dropped; how many shards.

    channels-redis (4.3) never does it itself: once its receive loop's read fails (Redis
    restarted, or it cut the client off at its output-buffer limit) and redis-py's one
    reconnect attempt fails too, redis-py's ``get_message`` finds the connection closed and
    answers None for ever, so every message to this worker's channels is lost. Any command
    on the PubSub object reconnects it, and redis-py's ``on_connect`` subscribes again to
    every channel it had: a PING is the cheapest. ``force``: PING where the connection looks
    open too (after an outage: a socket that died quietly fails on the PING, and the next
    call reconnects it). Can go once
    channels-redis reconnects its subscriptions."""
    done = 0
    for shard in _shards(layer):
        pubsub = shard._pubsub
        if pubsub is None or not pubsub.subscribed:
            continue
        connection = pubsub.connection
        if not force and connection is not None and connection.is_connected:
            continue
        async with shard._lock:
            await pubsub.ping()
        done += 1
    return done


class SubscriptionWatch:
    """Counts the re-connects of the pub/sub layer's subscription connections: each one means
    Redis dropped this worker's subscription (a restart, or it cut the client off at its
    output-buffer limit) and every message published to it meanwhile was lost. redis-py
    re-subscribes on a reconnect (``PubSub.on_connect``, a connect callback) and channels-redis
    carries on as if nothing happened; its connections' ``register_connect_callback`` (public
    in redis-py's ``Connection``) lets us hear of it too. ``watch`` registers on connections
    it has not seen, so a connection's first connect is not counted. Can go if channels-redis
    reports a lost subscription itself."""

    def __init__(self) -> None:
        self.reconnects = 0
        self._seen: set[int] = set()

    def watch(self, layer: Any) -> None:
        current: set[int] = set()
        for shard in _shards(layer):
            connection = getattr(shard._pubsub, "connection", None)
            if connection is None:
                continue
            current.add(id(connection))
            if id(connection) not in self._seen:
                connection.register_connect_callback(self._connected)
        self._seen = current

    async def _connected(self, connection: Any) -> None:
        self.reconnects += 1


def _reconnect_race(exc: BaseException | None, lost: tuple[type[BaseException], ...]) -> bool:
    """redis-py reconnecting the layer's pub/sub connection while another coroutine (a new
    channel's SUBSCRIBE, e.g. a publisher's socket opening again) reads it: asyncio's
    "read() called while another coroutine is already waiting", raised while handling the
    lost connection. channels-redis's receive loop retries a second later, as for the loss
    itself (seen in CI after a Redis restart with WebSocket publishers)."""
    if not isinstance(exc, RuntimeError) or "already waiting" not in str(exc):
        return False
    context = exc.__context__
    while context is not None:
        if isinstance(context, lost):
            return True
        context = context.__context__
    return False


class QuietConnectionErrors:
    """A logging filter for channels-redis's receive loop: a lost or stalled Redis connection
    is one line, not a traceback (the hub logs the outage once: recovery.py); anything else is
    logged as it was."""

    def filter(self, record: Any) -> bool:
        import redis.exceptions

        lost = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError)
        if record.exc_info and (
            isinstance(record.exc_info[1], lost) or _reconnect_race(record.exc_info[1], lost)
        ):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.levelname = "WARNING"
            record.levelno = 30
        return True

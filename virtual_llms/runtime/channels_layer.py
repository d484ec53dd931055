"""What the broker relies on in channels and channels-redis beyond their public API.

- **The pub/sub layer's wire format.** ``RedisPubSubChannelLayer.send(channel, message)``
  PUBLISHes ``serialize(message)`` (plain msgpack: no prefix, no encryption unless
  configured) to the Redis channel named ``channel`` on its one host. The broker's Redis
  scripts publish those same bytes themselves, in the round trip that writes a task's state
  (state/tasks.py, state/dispatch.py): one round trip instead of two, and off the layer's
  one publishing connection. :func:`pubsub_payload` gives the bytes, or None for any other
  layer (the caller then uses ``send``). Can go if channels-redis gains a way to send from
  a script, or if the broker publishes with its own client.
- **Closing the layer's connections per event loop.** Only the pub/sub layer has per-loop
  connections to close (its ``flush``, recognised by its ``_get_layer``).
- **A consumer's dispatch.** channels' ``AsyncConsumer.dispatch`` runs
  ``close_old_connections()`` on the sync thread before every message: for the control
  socket that is a thread hop per result or chunk frame (a fifth of its CPU under load).
  :class:`NoDatabaseCheckDispatch` dispatches without it; the one frame that touches the
  database (heartbeat) runs on the shared sync thread, whose connection the API handler's
  upkeep checks every second (runtime/django_asgi.py). Can go if channels makes the check
  optional.
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

"""The only module that touches the channel layer.

Every worker process has one channel (its hub, see hub.py) and is a member of the
WORKERS group. Tasks are routed with ``send`` to the hub that holds the publisher's stream;
task events go back with ``send`` to the requester's hub; rare notices (a token revoked, an
LLM evicted, a session closed, a wake's outcome) are broadcast to every hub.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings

from . import spill
from .errors import ServiceTimeout
from .runtime import channels_layer

WORKERS_GROUP = "mcpd.workers"


def layer() -> Any:
    return get_channel_layer()


async def new_channel() -> str:
    name: str = await layer().new_channel("mcpd.hub.")
    return name


# A send or broadcast that takes longer means the layer's Redis is stalled: the caller gets
# ServiceTimeout (a 503 for a request) instead of waiting for ever (redis-py sets no socket
# timeout on the layer's connections).
SEND_TIMEOUT_SECONDS = 2.0


async def resubscribe_dropped(*, force: bool = False) -> int:
    """Re-open the layer's subscriptions whose connection dropped (runtime/channels_layer.py);
    how many connections were re-opened. No I/O unless one did (or ``force``)."""
    return await channels_layer.resubscribe_dropped(layer(), force=force)


async def send(channel: str, message: Mapping[str, Any], payload: bytes | None = None) -> None:
    """Send ``message`` to a hub's channel; a big one as a reference to its bytes (spill.py).
    ``payload``: its layer_payload(), when the caller has it already."""
    if payload is None:
        payload = layer_payload(message)
    if payload is not None and spill.too_big(payload):
        # Outside the send's deadline: a burst of big bodies queues for the bytes client's
        # few connections (200 of 900 KB took over 2 s on a loaded host), and that client's
        # own timeouts bound a stalled Redis.
        message = await spill.reference(payload)
    try:
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await layer().send(channel, message)
    except TimeoutError as exc:
        raise ServiceTimeout("channel layer") from exc


def layer_payload(message: Mapping[str, Any]) -> bytes | None:
    """What the Redis pub/sub layer would PUBLISH for ``message``; None for any other layer
    (runtime/channels_layer.py). Settings give that layer REDIS_URL, the state's server."""
    return channels_layer.pubsub_payload(
        layer(), settings.CHANNEL_LAYERS["default"], settings.REDIS_URL, message
    )


def inline(payload: bytes | None) -> bytes | None:
    """``payload`` if it may ride pub/sub as it is, else None (spill.py)."""
    return None if payload is None or spill.too_big(payload) else payload


def direct_payload(message: Mapping[str, Any]) -> bytes | None:
    """What ``send(channel, message)`` would PUBLISH on the Redis pub/sub layer, for a caller
    that publishes it itself, inside the Redis script that also writes the task's state
    (state/): one round trip instead of two. None for any other layer, and for a message too
    big for pub/sub: the caller then uses ``send``, which sends a reference to it."""
    return inline(layer_payload(message))


def splice_base(message: Mapping[str, Any]) -> bytes | None:
    """direct_payload() of a message that lacks three entries a Redis script adds for the
    backend it chooses (``sid``, ``epoch``, ``tokenId``: state/lua/route.lua splices them
    into the map). None when there is no such layer, or the message is too big a map for
    the splice (a msgpack fixmap holds up to 15 entries)."""
    payload = direct_payload(message)
    if payload is None or payload[0] & 0xF0 != 0x80 or len(message) > 12:
        return None
    return payload


async def receive(channel: str) -> dict[str, Any]:
    """The channel's next message; one sent as a reference, taken from its blob."""
    while True:
        message: dict[str, Any] = await layer().receive(channel)
        if not spill.is_reference(message):
            return message
        whole = await spill.resolve(message, layer().deserialize)
        if whole is not None:
            return whole


async def join_workers(channel: str) -> None:
    await layer().group_add(WORKERS_GROUP, channel)


async def leave_workers(channel: str) -> None:
    await layer().group_discard(WORKERS_GROUP, channel)


async def broadcast(message: Mapping[str, Any]) -> None:
    try:
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await layer().group_send(WORKERS_GROUP, message)
    except TimeoutError as exc:
        raise ServiceTimeout("channel layer") from exc


def broadcast_sync(message: Mapping[str, Any]) -> None:
    """From sync code (admin actions, services run in a thread)."""
    async_to_sync(broadcast)(message)


async def close_layer() -> None:
    """Close this event loop's connections of the channel layer (tests, shutdown)."""
    await channels_layer.close(layer())


def reset_layers() -> None:
    """Drop cached layer instances (tests that run each case in a new event loop)."""
    channel_layers.backends = {}

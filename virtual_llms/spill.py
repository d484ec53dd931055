"""Big messages between workers travel under a key of their own, not on Redis pub/sub.

Redis cuts a subscriber off when more than its pub/sub output limit (32 MB by default, or 8 MB
for a minute) waits to be read, and every message to that worker's channels is then lost:
eight 9 MB requests at once lost five (issue 29). So a message whose bytes are over
``MCPD_PUBSUB_INLINE_BYTES`` (a task's big body, a big answer) is stored as a blob
(state/blobs.py) and a small reference published in its place; the receiving worker takes
the blob (read and deleted in one command) and handles the message as if it had come
whole. What rides pub/sub is then at most that many bytes per message in flight. Costs one
more round trip to Redis for each side of a big message, nothing for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings

from .state import get_state

log = logging.getLogger("mcpd.spill")

REFERENCE = "mcpd.spill"


def too_big(payload: bytes) -> bool:
    """Whether a message of these bytes must not ride pub/sub."""
    return len(payload) > settings.MCPD_PUBSUB_INLINE_BYTES


async def reference(payload: bytes) -> dict[str, Any]:
    """Store a big message's bytes: the small message to publish in its place."""
    blob = await get_state().blobs.put(payload)
    return {"type": REFERENCE, "blob": blob, "bytes": len(payload)}


def is_reference(message: dict[str, Any]) -> bool:
    return message.get("type") == REFERENCE


async def resolve(
    message: dict[str, Any], deserialize: Callable[[bytes], dict[str, Any]]
) -> dict[str, Any] | None:
    """The message a reference stands for, taken from its blob; None (logged) if the blob
    is gone: it outlived its TTL before this worker read it."""
    payload = await get_state().blobs.take(str(message.get("blob", "")))
    if payload is None:
        log.warning(
            "a big message (%s bytes) expired before this worker read it", message.get("bytes")
        )
        return None
    return deserialize(payload)

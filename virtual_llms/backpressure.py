"""Peers that stop reading: a publisher's control stream held to the publishers' bounds, which
closes and unbinds it as a disconnect (every other connection keeps the clients' bound)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings

from .runtime import send_buffers


def hold_control_stream(scope: Mapping[str, Any]) -> None:
    """Bound the control stream served on ``scope``'s connection: MCPD_PUBLISHER_BUFFER_BYTES
    waiting behind its full send buffer, and MCPD_PUBLISHER_STALL_SECONDS without progress.
    Past either the connection is closed; the stream's ``finally:`` unbinds the session as
    for any disconnect (binding.stream_close): its rows go inactive, its tasks fail or fail
    over. Nothing to do on a connection not served by ``manage.py serve``."""
    buffer = send_buffers.of(scope)
    if buffer is None:
        return
    buffer.limit = settings.MCPD_PUBLISHER_BUFFER_BYTES
    buffer.stall_after(settings.MCPD_PUBLISHER_STALL_SECONDS)

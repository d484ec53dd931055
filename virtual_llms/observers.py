"""The broker's events for whoever watches them (metrics.py, request_log.py): a control stream
opened or closed here, a wake this worker led. Each is told to plain callables on the event
loop, which do no I/O; a client call's end is inference.Outcome, told by inference.observers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("mcpd.observers")


@dataclass(frozen=True)
class StreamEvent:
    """A publisher's control stream, as it opened or closed on this worker."""

    session_id: str
    transport: str  # "sse" or "ws"
    epoch: str
    opened: bool  # False: it closed
    seconds: float = 0.0  # how long it was open (at its close)
    why: str = ""  # at its close: "end", "replaced" or "reconnect" (hub.Closing)


@dataclass(frozen=True)
class WakeEvent:
    """A wake this worker led (one per wake across workers: wake.py), as it ended."""

    model: str
    session_id: str
    ok: bool
    code: str  # the failure's code ("" when ok)
    seconds: float

    @property
    def outcome(self) -> str:
        """A bounded label: ``ok``, ``timeout`` or ``failed``."""
        if self.ok:
            return "ok"
        return "timeout" if self.code == "timeout" else "failed"


stream_observers: list[Callable[[StreamEvent], None]] = []
wake_observers: list[Callable[[WakeEvent], None]] = []

# The streams told as opened and not yet closed, by epoch: when each opened.
_open_streams: dict[str, float] = {}


def _tell(observers: list[Callable[[StreamEvent], None]], event: StreamEvent) -> None:
    for observer in observers:
        try:
            observer(event)
        except Exception:
            log.exception("a stream observer failed")


def stream_opened(session_id: str, transport: str, epoch: str) -> None:
    _open_streams[epoch] = time.monotonic()
    _tell(stream_observers, StreamEvent(session_id, transport, epoch, opened=True))


def stream_closed(session_id: str, transport: str, epoch: str, why: str) -> None:
    """Told once per stream told opened (a stream that never bound is not told)."""
    opened = _open_streams.pop(epoch, None)
    if opened is None:
        return
    seconds = time.monotonic() - opened
    _tell(
        stream_observers,
        StreamEvent(session_id, transport, epoch, opened=False, seconds=seconds, why=why),
    )


def wake_ended(event: WakeEvent) -> None:
    for observer in wake_observers:
        try:
            observer(event)
        except Exception:
            log.exception("a wake observer failed")

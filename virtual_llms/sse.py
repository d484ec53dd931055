"""Server-sent events framing, for every stream the broker writes: the publisher's control
stream and the client's streamed answers (https://html.spec.whatwg.org/#server-sent-events)."""

from __future__ import annotations

from typing import Any

from . import jsonio

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CONTENT_TYPE = "text/event-stream"
PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


def event(name: str | None, data: Any, event_id: str | None = None) -> bytes:
    """One event whose data is ``data`` as JSON on one line."""
    lines = []
    if name:
        lines.append(f"event: {name}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {jsonio.dumps_line(data)}")
    return ("\n".join(lines) + "\n\n").encode()


def data(text: str) -> bytes:
    """One event carrying ``text``; a text with line breaks becomes several data lines of one
    event (the reader joins them with ``\\n``)."""
    return ("".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def comment(text: str) -> bytes:
    """A comment line: readers skip it; it keeps proxies from cutting a quiet stream."""
    return f": {text}\n\n".encode()

"""Server-sent events framing, for every stream the broker writes: the publisher's control
stream and the client's streamed answers (https://html.spec.whatwg.org/#server-sent-events)."""

from __future__ import annotations

import re
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


# SSE ends a line at CR, LF or CRLF; str.splitlines() (httpx's line reader, and so the openai
# SDK's) also at these, which JSON leaves raw only inside a string (or not at all).
_LINE_END = re.compile("\r\n|\r|\n")
_OTHER_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def data(text: str) -> bytes:
    """One event carrying ``text``, whatever it holds: no text can end the event early or
    start another (a publisher's chunk ``"x\\r\\ndata: [DONE]"`` stays one event of data
    ``"x\\ndata: [DONE]"``). Each CR, LF or CRLF starts a new ``data:`` line of the same event
    (readers join them with LF: the same JSON, whose raw line ends are whitespace); any other
    character a line reader may split at is written as its JSON escape (the same value inside
    a JSON string, which is the only place JSON may hold it)."""
    lines = text.splitlines()  # splits at exactly those characters: 0.2 us for a chunk
    if len(lines) == 1 and len(lines[0]) == len(text):  # nearly every chunk
        return f"data: {text}\n\n".encode()
    text = _OTHER_BREAKS.sub(_escaped, text)
    return ("".join(f"data: {line}\n" for line in _LINE_END.split(text)) + "\n").encode()


def comment(text: str) -> bytes:
    """A comment line: readers skip it; it keeps proxies from cutting a quiet stream."""
    return f": {text}\n\n".encode()

"""A Server-Sent Events decoder (the WHATWG event-stream rules), fed one line at a time.

Used for the broker's control stream and for an upstream's streamed answer alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SseDecoder:
    """Feed lines without their line break; a blank line ends an event."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.comments = 0  # keep-alive comments seen (": ping")

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.
        return None

    def flush(self) -> SseEvent | None:
        """The last event of a stream that ended without its blank line (lenient)."""
        return self._dispatch()

    def _dispatch(self) -> SseEvent | None:
        event = None
        if self._data:
            event = SseEvent("\n".join(self._data), self._event or "message", self._id)
        self._data, self._event, self._id = [], "", None
        return event


async def sse_events(lines: AsyncIterable[str]) -> AsyncIterator[SseEvent]:
    """The events of a stream of lines, as they arrive."""
    decoder = SseDecoder()
    async for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
    last = decoder.flush()
    if last is not None:
        yield last

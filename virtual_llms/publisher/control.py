"""The control stream: task frames from the broker, over SSE or a WebSocket.

Both transports yield the same frames: ``{"type": "ready", ...}`` first, then
``{"type": "task", "kind": ..., "taskId": ..., ...}``. The stream ends with
:class:`StreamRefused` (the broker said no: bad token, unknown session) or
:class:`StreamLost` (anything else: it closed, the connection broke, it went quiet).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import websockets
from httpx_sse import EventSource

from .broker import USER_AGENT, BrokerClient, error_of
from .logs import log

Frame = dict[str, Any]

# The broker sends a ": ping" comment every 15 s: three missed pings mean the line is dead.
SSE_READ_TIMEOUT = 45.0
# The broker's daphne pings the socket every 15 s; our own pings detect a dead line too.
WS_PING_INTERVAL = 20.0
WS_PING_TIMEOUT = 20.0
# WebSocket close codes of a refused handshake (PROTOCOL.md's 401/403/404, + 4000).
WS_REFUSED = {4401: 401, 4403: 403, 4404: 404}


class StreamRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message


class StreamLost(Exception):
    pass


def stream_path(session_id: str, transport: str) -> str:
    leaf = "ws" if transport == "ws" else "stream"
    return f"/api/v1/virtual/sessions/{session_id}/{leaf}"


def open_stream(
    broker: BrokerClient, session_id: str, transport: str
) -> AsyncGenerator[Frame, None]:
    """The frames of one control stream on the broker's current URL, until it ends. An async
    generator: close it (``contextlib.aclosing``) to hang up."""
    if transport == "ws":
        return _ws_frames(broker, session_id)
    return _sse_frames(broker, session_id)


async def _sse_frames(broker: BrokerClient, session_id: str) -> AsyncGenerator[Frame, None]:
    url = broker.url + stream_path(session_id, "sse")
    timeout = httpx.Timeout(10.0, read=SSE_READ_TIMEOUT)
    try:
        async with broker.http.stream(
            "GET", url, timeout=timeout, headers={"Accept": "text/event-stream"}
        ) as response:
            if response.status_code != 200:
                error = error_of(response.status_code, await response.aread())
                if response.status_code in (401, 403, 404):
                    raise StreamRefused(error.status, error.message)
                raise StreamLost(f"the broker answered {error}")
            async for event in EventSource(response).aiter_sse():
                frame = _decode(event.data)
                if frame is not None and event.event in ("ready", "task"):
                    yield {**frame, "type": event.event}
    except httpx.TimeoutException:
        raise StreamLost(f"no data for {SSE_READ_TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:
        raise StreamLost(str(exc) or type(exc).__name__) from None
    raise StreamLost("the broker closed the stream")


async def _ws_frames(broker: BrokerClient, session_id: str) -> AsyncGenerator[Frame, None]:
    base = broker.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    refusal = ""
    try:
        async with websockets.connect(
            base + stream_path(session_id, "ws"),
            additional_headers={"Authorization": f"Bearer {broker.token}"},
            user_agent_header=USER_AGENT,
            max_size=None,  # a task frame carries a whole request body (up to 10 MiB)
            open_timeout=10.0,
            ping_interval=WS_PING_INTERVAL,
            ping_timeout=WS_PING_TIMEOUT,
            close_timeout=5.0,
        ) as socket:
            async for message in socket:
                frame = _decode(message)
                if frame is None:
                    continue
                kind = frame.get("type")
                if kind in ("ready", "task"):
                    yield frame
                elif kind == "error":  # sent just before a 44xx close: why we were refused
                    error = frame.get("error")
                    refusal = str(error.get("message", "")) if isinstance(error, dict) else ""
                elif kind == "protocol_error":
                    log.warning("the broker refused a frame: %s", frame.get("message"))
            _raise_for_close(socket.close_code, socket.close_reason, refusal)
    except websockets.ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        _raise_for_close(code, exc.rcvd.reason if exc.rcvd is not None else "", refusal)
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        error = error_of(status, exc.response.body or b"")
        if status in (401, 403, 404):
            raise StreamRefused(status, error.message) from None
        raise StreamLost(f"the broker refused the socket: {error}") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise StreamLost(str(exc) or type(exc).__name__) from None


def _raise_for_close(code: int | None, reason: str | None, refusal: str) -> None:
    if code in WS_REFUSED:
        raise StreamRefused(WS_REFUSED[code], refusal or reason or "refused")
    if code is None:
        raise StreamLost("the connection broke (no close frame)")
    raise StreamLost(f"the broker closed the socket (code {code}{', ' + reason if reason else ''})")


def _decode(text: str | bytes) -> Frame | None:
    try:
        frame = json.loads(text)
    except ValueError:
        log.warning("ignoring a control frame that is not JSON: %.200r", text)
        return None
    if not isinstance(frame, dict):
        log.warning("ignoring a control frame that is not an object: %.200r", text)
        return None
    return frame

"""The control stream: task frames from the broker, over SSE or a WebSocket.

Both transports yield the same frames: ``{"type": "ready", ...}`` first, then
``{"type": "task", "kind": ..., "taskId": ..., ...}``. The stream ends with
:class:`StreamRefused` (the broker said no: bad token, unknown session) or
:class:`StreamLost` (anything else: it closed, the connection broke, it went quiet).

A WebSocket also carries answers the other way (PROTOCOL.md: the publisher may send
``result``/``chunks``/``error`` frames on it): while it is open, :class:`Uplink` sends them.
That saves an HTTP request per answer, on both sides.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import websockets
from httpx_sse import EventSource
from websockets.asyncio.client import ClientConnection

from .. import jsonio
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
# The close code of a draining worker's sockets (the broker's consumers.CLOSING_CODES).
WS_RECONNECT = 4503
WS_REPLACED = 4409  # a newer stream holds the session (virtual_llms/consumers.py)


# A result bigger than this goes over HTTP, where the broker can refuse it (413) without
# closing the socket that every other task's frames use.
SOCKET_RESULT_BYTES = 1024 * 1024


class Uplink:
    """Task answers on the WebSocket control stream while it is open.

    ``on_refused(task_id, code, message)`` is called for each ``protocol_error`` that names a
    task: the broker did not take an answer of that task (``code`` ``task_not_found``: the
    task is over, e.g. its client left)."""

    def __init__(self, on_refused: Callable[[str, str, str], None]) -> None:
        self.socket: ClientConnection | None = None
        self.on_refused = on_refused

    async def send(self, frame: Frame, *, max_bytes: int | None = None) -> bool:
        """Send one answer frame. False if it was not sent: no socket is open (or it closed
        under us), or it is bigger than ``max_bytes``; the caller posts it over HTTP then."""
        socket = self.socket
        if socket is None:
            return False
        data = jsonio.dumps(frame)  # UTF-8: its length is what the broker's limit counts
        if max_bytes is not None and len(data) > max_bytes:
            return False
        try:
            await socket.send(data, text=True)
        except websockets.ConnectionClosed:
            return False
        return True


class StreamRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message


class StreamLost(Exception):
    pass


class Redirected(StreamLost):
    """The broker worker is draining (SSE ``event: reconnect``, WebSocket close 4503): open
    the stream again at once, on the next broker URL, without backing off."""


class Replaced(StreamLost):
    """Another stream took this session over (SSE ``event: replaced``, WebSocket close 4409):
    most often a second agent started with the same state file. The agent says so and waits
    its longest backoff before taking the session back, so two agents do not fight."""

    def __init__(self) -> None:
        super().__init__(
            "another agent holds this session (replaced stream); is a second mcpd-publish "
            "running with the same state file?"
        )


def stream_path(session_id: str, transport: str) -> str:
    leaf = "ws" if transport == "ws" else "stream"
    return f"/api/v1/virtual/sessions/{session_id}/{leaf}"


def socket_url(broker_url: str, session_id: str) -> str:
    """The WebSocket stream's URL on a broker URL (``http`` → ``ws``, ``https`` → ``wss``)."""
    base = broker_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return base + stream_path(session_id, "ws")


def open_stream(
    broker: BrokerClient, session_id: str, transport: str, uplink: Uplink | None = None
) -> AsyncGenerator[Frame, None]:
    """The frames of one control stream on the broker's current URL, until it ends. An async
    generator: close it (``contextlib.aclosing``) to hang up. Over a WebSocket, ``uplink``
    sends on the socket while it is open."""
    if transport == "ws":
        return _ws_frames(broker, session_id, uplink)
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
                if event.event == "reconnect":
                    raise Redirected("the broker worker is draining")
                if event.event == "replaced":
                    raise Replaced()
                # Other events are skipped unread: once a task event set the last event id,
                # the SSE decoder reports every keep-alive comment as an empty event.
                if event.event not in ("ready", "task"):
                    continue
                frame = _decode(event.data)
                if frame is not None:
                    yield {**frame, "type": event.event}
    except httpx.TimeoutException:
        raise StreamLost(f"no data for {SSE_READ_TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:
        raise StreamLost(str(exc) or type(exc).__name__) from None
    raise StreamLost("the broker closed the stream")


async def _ws_frames(
    broker: BrokerClient, session_id: str, uplink: Uplink | None
) -> AsyncGenerator[Frame, None]:
    refusal = ""
    try:
        async with websockets.connect(
            socket_url(broker.url, session_id),
            additional_headers={"Authorization": f"Bearer {broker.token}"},
            user_agent_header=USER_AGENT,
            max_size=None,  # a task frame carries a whole request body (up to 10 MiB)
            open_timeout=10.0,
            ping_interval=WS_PING_INTERVAL,
            ping_timeout=WS_PING_TIMEOUT,
            close_timeout=5.0,
        ) as socket:
            try:
                async for message in socket:
                    frame = _decode(message)
                    if frame is None:
                        continue
                    kind = frame.get("type")
                    if kind == "ready" and uplink is not None:
                        uplink.socket = socket
                    if kind in ("ready", "task"):
                        yield frame
                    elif kind == "error":  # sent just before a 44xx close: why we were refused
                        error = frame.get("error")
                        refusal = str(error.get("message", "")) if isinstance(error, dict) else ""
                    elif kind == "protocol_error":
                        _on_protocol_error(frame, uplink)
            finally:
                if uplink is not None and uplink.socket is socket:
                    uplink.socket = None
            _raise_for_close(socket.close_code, socket.close_reason, refusal)
    except websockets.ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        _raise_for_close(code, exc.rcvd.reason if exc.rcvd is not None else "", refusal)
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        error = error_of(status, bytes(exc.response.body or b""))
        if status in (401, 403, 404):
            raise StreamRefused(status, error.message) from None
        raise StreamLost(f"the broker refused the socket: {error}") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise StreamLost(str(exc) or type(exc).__name__) from None


def _on_protocol_error(frame: Frame, uplink: Uplink | None) -> None:
    task_id = frame.get("taskId")
    message = str(frame.get("message", ""))
    if uplink is not None and isinstance(task_id, str):
        uplink.on_refused(task_id, str(frame.get("code", "")), message)
    else:
        log.warning("the broker refused a frame: %s", message)


def _raise_for_close(code: int | None, reason: str | None, refusal: str) -> None:
    if code in WS_REFUSED:
        raise StreamRefused(WS_REFUSED[code], refusal or reason or "refused")
    if code == WS_RECONNECT:
        raise Redirected(f"the broker worker is draining (code {code})")
    if code == WS_REPLACED:
        raise Replaced()
    if code is None:
        raise StreamLost("the connection broke (no close frame)")
    raise StreamLost(f"the broker closed the socket (code {code}{', ' + reason if reason else ''})")


def _decode(text: str | bytes) -> Frame | None:
    try:
        frame = jsonio.loads(text)
    except ValueError:
        log.warning("ignoring a control frame that is not JSON: %.200r", text)
        return None
    if not isinstance(frame, dict):
        log.warning("ignoring a control frame that is not an object: %.200r", text)
        return None
    return frame

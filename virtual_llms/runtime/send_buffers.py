"""What each connection's transport holds unsent, told to the application, and a bound on it.

daphne's ASGI ``send`` never blocks and Twisted's transport buffers whatever it is given, so
a peer that stops reading (a client of a streamed answer, a publisher's control stream)
would have the worker buffer for it without limit (issue 29 item 4). :class:`MeteredServer`
gives every connection a :class:`SendBuffer`, in its scope as the ASGI extension
``mcpd.send_buffer``: the application sets its bounds there (virtual_llms/backpressure.py).

Relies on:

- daphne 4.2's ``Server.create_application(protocol, scope)``, called for each HTTP request
  and each WebSocket with its protocol object (``http_protocol.WebRequest``, a Twisted
  ``Request``; ``ws_protocol.WebSocketProtocol``, autobahn's) before the application starts,
  and ``Server.handle_reply(protocol, message)``, which each ASGI ``send`` of that
  application calls (``send=partial(self.handle_reply, protocol)``); daphne's own refusals
  (``basic_error``) call the protocol directly and are not counted;
- Twisted's ``FileDescriptor`` buffering (private): what a transport holds unsent is its
  ``dataBuffer`` from ``offset`` on plus ``_tempDataLen``, read only while it is full;
- Twisted's producer API (public): a streaming producer registered with a ``Request`` (or a
  transport) hears ``pauseProducing`` when the transport holds more than its ``bufferSize``
  (64 KiB) unsent and ``resumeProducing`` once it has sent all of it; a ``Request`` must have
  its producer unregistered before it finishes;
- after a WebSocket upgrade, daphne leaves the HTTP channel it upgraded from registered as
  the transport's producer, with nothing left to pause: the socket's transport gets this
  module's producer instead;
- ``TCP_USER_TIMEOUT`` (Linux): the kernel ends a connection whose sent bytes stay
  unacknowledged, or unsent behind a zero window, that long.

tests/test_runtime.py checks each. Can go if daphne applies back-pressure to ``send`` (as
uvicorn does) and lets the application see its transport's buffer.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger("mcpd.backpressure")

EXTENSION = "mcpd.send_buffer"
_ATTR = "mcpd_send_buffer"  # the protocol's SendBuffer
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only


class SendBuffer:
    """One connection's send buffer as its transport reports it (a Twisted ``IPushProducer``;
    Twisted does not check the interface, only calls it). ``held``: the bytes the
    application sent while the transport was full (holding more than its 64 KiB unsent), at
    most what it holds unsent, i.e. what waits behind a full buffer; past ``limit`` (0: no
    bound) the connection is aborted, and the application hears a disconnect, as if its
    peer had left. The write that filled the buffer is not counted: one big answer or task
    frame is not a peer that stopped reading."""

    def __init__(
        self,
        transport: Any,
        abort: Callable[[], None],
        limit: int,
        what: str,
        register: Callable[[Any], None] | None = None,
        unregister: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.limit = limit
        self.what = what  # the path, for the log line
        self.full = False
        self.held = 0
        self.overflowed = False  # this module closed the connection
        self.attached = False
        self._abort = abort
        self._register = register
        self._unregister = unregister

    # --- IPushProducer: called by Twisted ----------------------------------------------------

    def pauseProducing(self) -> None:
        if not self.full:  # Twisted says it again at every write while the buffer is full
            self.full, self.held = True, 0

    def resumeProducing(self) -> None:
        self.full, self.held = False, 0

    def stopProducing(self) -> None:
        self.full = False

    # --- for the server and the application ----------------------------------------------------

    def attach(self) -> None:
        """Register with the transport (once), to hear when it fills and drains."""
        if not self.attached and self._register is not None:
            self.attached = True
            self._register(self)

    def detach(self) -> None:
        if self.attached and self._unregister is not None:
            self.attached = False
            self._unregister()

    def hand_over(self, size: int) -> bool:
        """Count ``size`` bytes sent while the transport is full; past the limit, abort the
        connection and answer False (the bytes are dropped)."""
        if self.overflowed:
            return False
        # What came since it filled, but never more than it holds: a peer that reads slower
        # than it is sent to (never draining it all) is not charged for what it took.
        self.held += size
        unsent = _unsent(self.transport)  # before this message is written
        if unsent is not None and unsent + size < self.held:
            self.held = unsent + size
        if not self.limit or self.held <= self.limit:
            return True
        self.overflowed = True
        log.warning(
            "closed a connection whose peer stopped reading: %d bytes waited behind a full "
            "send buffer (bound %d) on %s",
            self.held,
            self.limit,
            self.what,
        )
        self.detach()
        self._abort()
        return False

    def stall_after(self, seconds: float) -> bool:
        """Have the kernel end the connection once the bytes sent on it make no progress for
        ``seconds`` (the peer's window stays shut, or nothing is acknowledged): TCP's own
        user timeout. False where the socket has none (not Linux, a Unix socket, no socket)."""
        sock = _socket_of(self.transport)
        if sock is None or TCP_USER_TIMEOUT is None or seconds <= 0:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(seconds * 1000))
        except OSError:
            return False
        return True


def _unsent(transport: Any) -> int | None:
    """The bytes Twisted's transport under ``transport`` holds unsent (its ``dataBuffer``
    from ``offset`` on, and ``_tempDataLen`` more), or None for a transport without them."""
    for _ in range(4):
        if transport is None:
            return None
        pending = getattr(transport, "_tempDataLen", None)
        if isinstance(pending, int):
            held: int = len(transport.dataBuffer) - transport.offset + pending
            return held
        transport = getattr(transport, "transport", None)  # through TLS and other wrappers
    return None


def _socket_of(transport: Any) -> socket.socket | None:
    """The socket under ``transport`` (through TLS and other protocol wrappers)."""
    for _ in range(4):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


def of(scope: Mapping[str, Any]) -> SendBuffer | None:
    """The connection's SendBuffer, when it is served by :class:`MeteredServer`."""
    extension = scope.get("extensions", {}).get(EXTENSION)
    return extension.get("buffer") if extension else None


def _size(message: Mapping[str, Any]) -> int:
    data = message.get("body") or message.get("bytes") or message.get("text") or b""
    return len(data)


class MeteredServer:
    """A mixin for daphne's ``Server``: a :class:`SendBuffer` per connection (HTTP request or
    WebSocket), bounded by ``default_limit`` until the application says otherwise."""

    default_limit = 0

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        try:
            buffer = _buffer_for(protocol, scope, self.default_limit)
        except Exception:  # a transport unlike daphne's: served as before, without a bound
            log.exception("no send buffer for %s", scope.get("path"))
        else:
            setattr(protocol, _ATTR, buffer)
            scope.setdefault("extensions", {})[EXTENSION] = {"buffer": buffer}
        return super().create_application(protocol, scope)  # type: ignore[misc]  # daphne

    def handle_reply(self, protocol: Any, message: dict[str, Any]) -> Awaitable[None]:
        # Per message: an attribute read and two compares; the count only while full. Not a
        # coroutine itself: the application's send awaits daphne's coroutine directly.
        buffer: SendBuffer | None = getattr(protocol, _ATTR, None)
        if buffer is not None:
            if buffer.full and not buffer.hand_over(_size(message)):
                return _dropped()
            if message.get("more_body"):
                if not buffer.attached:
                    buffer.attach()  # a streamed answer: hear when the transport fills
            elif buffer.attached and message.get("type") == "http.response.body":
                buffer.detach()  # its last part: Twisted wants no producer at finish
        reply: Awaitable[None] = super().handle_reply(protocol, message)  # type: ignore[misc]  # daphne
        return reply


async def _dropped() -> None:
    """What ``send`` awaits for a message dropped on a connection being aborted."""


def _buffer_for(protocol: Any, scope: Mapping[str, Any], limit: int) -> SendBuffer:
    what = str(scope.get("path", ""))
    if scope["type"] == "websocket":
        transport = protocol.transport

        def register(producer: Any) -> None:
            transport.unregisterProducer()  # the HTTP channel daphne upgraded from
            transport.registerProducer(producer, True)

        buffer = SendBuffer(
            transport,
            lambda: protocol.dropConnection(abort=True),
            limit,
            what,
            register,
            transport.unregisterProducer,
        )
        buffer.attach()
        return buffer

    # An HTTP request (a Twisted Request): its producer is registered while a streamed
    # answer is written, and unregistered before the last part (Request.finish).
    def register_with_request(producer: Any) -> None:
        if protocol.channel is not None and not protocol.finished:
            protocol.registerProducer(producer, True)

    def unregister_from_request() -> None:
        if protocol.producer is not None and protocol.channel is not None:
            protocol.unregisterProducer()

    return SendBuffer(
        protocol.transport,
        lambda: protocol.transport.abortConnection(),
        limit,
        what,
        register_with_request,
        unregister_from_request,
    )

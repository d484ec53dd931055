"""backpressure.py: a control stream's connection gets the publishers' bounds."""

from __future__ import annotations

import socket
import sys
from typing import Any

import pytest

from virtual_llms.backpressure import hold_control_stream
from virtual_llms.runtime.send_buffers import EXTENSION, SendBuffer

LINUX = pytest.mark.skipif(sys.platform != "linux", reason="TCP_USER_TIMEOUT is Linux's")


class Transport:
    """What SendBuffer asks of a Twisted transport here: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


def scope_with(buffer: SendBuffer) -> dict[str, Any]:
    return {"type": "http", "extensions": {EXTENSION: {"buffer": buffer}}}


@LINUX
def test_a_control_stream_gets_the_publishers_bounds(settings: Any) -> None:
    settings.MCPD_PUBLISHER_BUFFER_BYTES = 123_456
    settings.MCPD_PUBLISHER_STALL_SECONDS = 3.0
    with socket.socket() as sock:
        buffer = SendBuffer(Transport(sock), lambda: None, 1000, "/stream")
        hold_control_stream(scope_with(buffer))
        assert buffer.limit == 123_456
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000


@LINUX
def test_no_stall_bound_leaves_the_kernels_default(settings: Any) -> None:
    settings.MCPD_PUBLISHER_STALL_SECONDS = 0.0
    with socket.socket() as sock:
        buffer = SendBuffer(Transport(sock), lambda: None, 1000, "/stream")
        hold_control_stream(scope_with(buffer))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


def test_a_connection_served_without_send_buffers_is_left_as_it_is() -> None:
    hold_control_stream({"type": "http"})  # Django's test client, plain daphne


def test_past_the_bound_the_connection_is_aborted_once() -> None:
    aborted: list[bool] = []
    buffer = SendBuffer(None, lambda: aborted.append(True), 100, "/v1/chat/completions")
    buffer.pauseProducing()
    assert buffer.hand_over(60)
    buffer.pauseProducing()  # Twisted says it at every write while full: no reset
    assert buffer.hand_over(40)
    assert not aborted
    assert not buffer.hand_over(1)
    assert not buffer.hand_over(1)
    assert aborted == [True]
    assert buffer.overflowed


def test_a_drained_buffer_starts_counting_again() -> None:
    buffer = SendBuffer(None, lambda: None, 100, "/x")
    buffer.pauseProducing()
    assert buffer.hand_over(90)
    buffer.resumeProducing()
    assert not buffer.full
    assert buffer.held == 0
    buffer.pauseProducing()
    assert buffer.hand_over(90)
    assert not buffer.overflowed

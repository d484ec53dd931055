"""Peers that stop reading, for the tests and the bench: raw sockets with a tiny receive buffer
(so "not reading" fills the kernel's buffers, then the worker's), and a worker's memory."""

from __future__ import annotations

import base64
import json
import os
import socket

from tests.cluster import Broker
from tests.contract_support import chat_body

# A receive buffer this small (the kernel makes it a few KiB) fills with one big frame.
SMALL_RCVBUF = 4096


def rss_bytes(pid: int) -> int:
    """The process's resident set, from /proc/<pid>/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def slow_socket(broker: Broker, worker: int) -> socket.socket:
    """A connection to ``worker`` whose receive buffer is tiny (set before connecting, so
    the window it offers is small from the start)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", broker.ports[worker]))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read until ``marker`` arrived (a little at a time: what follows stays unread)."""
    seen = b""
    while marker not in seen:
        data = sock.recv(256)
        assert data, f"closed before {marker!r}: {seen[-300:]!r}"
        seen += data
    return seen


def open_sse_stream(broker: Broker, worker: int, token: str, session_id: str) -> socket.socket:
    sock = slow_socket(broker, worker)
    sock.sendall(
        f"GET /api/v1/virtual/sessions/{session_id}/stream HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = read_until(sock, b"event: ready")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def open_ws_stream(broker: Broker, worker: int, token: str, session_id: str) -> socket.socket:
    sock = slow_socket(broker, worker)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/v1/virtual/sessions/{session_id}/ws HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = read_until(sock, b'"ready"')
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return sock


def stop_reading_a_stream(broker: Broker, worker: int, token: str, name: str) -> socket.socket:
    """A streamed call whose client reads its status line and first event, then nothing."""
    sock = slow_socket(broker, worker)
    body = json.dumps(chat_body(name, "a long answer", stream=True)).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = read_until(sock, b"data: ")
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    return sock

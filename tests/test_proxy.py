"""Public LLMs in process: proxied with httpx to a real local upstream, streamed or not, with
the stored key; an unreachable upstream is a 502 in OpenAI's shape."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from tests.conftest import Tokens
from virtual_llms import services

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_orm")]


class Upstream(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for part in ("one", "two"):
                self.wfile.write(f"data: {part}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps({"object": "chat.completion", "echo": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


async def call(tokens: Tokens, body: dict[str, Any]) -> Any:
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {tokens.client_plain}"},
    )


async def make_public(url: str) -> None:
    await sync_to_async(services.llm_create_public)(
        name="pub", type="openai", model="gpt-x", url=url, api_key="sk-upstream"
    )


async def test_a_public_llm_is_proxied_with_its_model_and_key(
    tokens: Tokens, upstream: str
) -> None:
    await make_public(upstream)
    response = await call(tokens, {"model": "pub", "messages": []})
    assert response.status_code == 200
    assert json.loads(response.content) == {"object": "chat.completion", "echo": "gpt-x"}
    assert "mcpd;dur=" in response["Server-Timing"]
    seen = Upstream.seen[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["auth"] == "Bearer sk-upstream"


async def test_a_public_llm_streams_through(tokens: Tokens, upstream: str) -> None:
    await make_public(upstream)
    response = await call(tokens, {"model": "pub", "stream": True, "messages": []})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert body == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"


async def test_an_unreachable_upstream_is_502(tokens: Tokens) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    await make_public(f"http://127.0.0.1:{port}/v1")
    response = await call(tokens, {"model": "pub", "messages": []})
    assert response.status_code == 502
    error = json.loads(response.content)["error"]
    assert error["code"] == "upstream_unreachable"
    assert "sk-upstream" not in response.content.decode()

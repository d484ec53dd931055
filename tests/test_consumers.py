"""The publisher's control socket in process (channels' WebsocketCommunicator against the real
ASGI application, hub and channel layer)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from mcpd_site.asgi import application
from tests.conftest import Tokens
from virtual_llms import relay
from virtual_llms.models import Llm

pytestmark = pytest.mark.django_db(transaction=True)


def socket(token: str, session_id: str = "sess") -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application,
        f"/api/v1/virtual/sessions/{session_id}/ws",
        headers=[(b"authorization", f"Bearer {token}".encode())],
    )


async def receive(ws: WebsocketCommunicator) -> dict[str, Any]:
    return dict(json.loads(await ws.receive_from(timeout=5)))


async def test_the_socket_carries_tasks_and_results(
    tokens: Tokens, virtual_llm: None, hub: relay.Hub
) -> None:
    ws = socket(tokens.publisher_plain)
    connected, _ = await ws.connect()
    assert connected
    assert await receive(ws) == {"type": "ready", "providerSessionId": "sess"}
    pending, _ = await relay.enqueue_infer(await relay.load_virtual("m1"), {"model": "m1"}, False)
    frame = await receive(ws)
    assert frame["type"] == "task"
    assert frame["kind"] == "infer"
    assert frame["taskId"] == pending.task_id
    assert frame["body"] == {"model": "up"}
    await ws.send_to(
        text_data=json.dumps(
            {"type": "result", "taskId": pending.task_id, "status": 200, "body": {"ok": 1}}
        )
    )
    assert (await relay.next_event(pending, 5))["body"] == {"ok": 1}
    # A second answer for the finished task is refused, naming the task; the socket stays.
    await ws.send_to(
        text_data=json.dumps({"type": "error", "taskId": pending.task_id, "error": "late"})
    )
    refused = await receive(ws)
    assert refused["type"] == "protocol_error"
    assert refused["taskId"] == pending.task_id
    assert refused["code"] == "task_not_found"
    await ws.send_to(text_data=json.dumps({"type": "heartbeat"}))
    assert await receive(ws) == {"type": "heartbeat", "ok": True, "llms": 1}
    await ws.disconnect()
    # Closing the socket unbinds the session.
    assert await sync_to_async(lambda: Llm.objects.get(name="m1").status)() == "inactive"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1]", "invalid_request"),
        ('{"no": "type"}', "invalid_request"),
        ('{"type": "bogus", "taskId": "t"}', "invalid_request"),
        ('{"type": "result"}', "invalid_request"),
    ],
)
async def test_a_malformed_frame_gets_protocol_error_and_the_socket_stays(
    tokens: Tokens, virtual_llm: None, hub: relay.Hub, raw: str, code: str
) -> None:
    ws = socket(tokens.publisher_plain)
    await ws.connect()
    await receive(ws)  # ready
    await ws.send_to(text_data=raw)
    refused = await receive(ws)
    assert refused["type"] == "protocol_error"
    assert refused["code"] == code
    await ws.send_to(text_data=json.dumps({"type": "heartbeat"}))
    assert (await receive(ws))["type"] == "heartbeat"
    await ws.disconnect()


@pytest.mark.parametrize(("who", "code"), [("other", 4403), ("client", 4403), ("nobody", 4401)])
async def test_a_refused_handshake_says_why_and_closes(
    tokens: Tokens, virtual_llm: None, hub: relay.Hub, who: str, code: int
) -> None:
    token = {
        "other": tokens.other_publisher_plain,
        "client": tokens.client_plain,
        "nobody": "mcpd_x_y",
    }[who]
    ws = socket(token)
    await ws.connect()
    error = await receive(ws)
    assert error["type"] == "error"
    assert error["error"]["code"] in {"forbidden", "unauthorized"}
    assert (await ws.receive_output(timeout=5))["code"] == code

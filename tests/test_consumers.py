"""The publisher's control socket in process (channels' WebsocketCommunicator against the real
ASGI application, hub and channel layer)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from mcpd_site.asgi import application
from tests.conftest import Tokens
from virtual_llms import answers, inference, rowcache, tasks
from virtual_llms import hub as hub_mod
from virtual_llms.models import Llm


async def next_ev(pending: hub_mod.Pending, timeout: float = 5.0) -> dict[str, Any]:
    """The task's next event, as a plain dict (its keys checked by the assertions)."""
    return dict(await tasks.next_event(pending, timeout))


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
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    ws = socket(tokens.publisher_plain)
    connected, _ = await ws.connect()
    assert connected
    assert await receive(ws) == {"type": "ready", "providerSessionId": "sess"}
    pending, _ = await inference.enqueue_infer(
        await rowcache.load_virtual("m1"), {"model": "m1"}, False
    )
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
    assert answers.result_body(await next_ev(pending, 5)) == {"ok": 1}
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


async def bound_with_two_tasks(
    tokens: Tokens, *, streaming: bool
) -> tuple[WebsocketCommunicator, hub_mod.Pending, hub_mod.Pending]:
    """A publisher socket bound to the session, and two tasks of m1 whose frames it has read."""
    ws = socket(tokens.publisher_plain)
    await ws.connect()
    await receive(ws)  # ready
    llm = await rowcache.load_virtual("m1")
    first, second = [
        (await inference.enqueue_infer(llm, {"model": "m1"}, streaming))[0] for _ in range(2)
    ]
    for _ in range(2):
        await receive(ws)  # the two task frames
    return ws, first, second


async def test_frames_of_different_tasks_are_handled_at_once_and_of_one_task_in_order(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow hand-over of one task's frame holds back that task's later frames only."""
    ws, slow, quick = await bound_with_two_tasks(tokens, streaming=True)
    release = asyncio.Event()
    handled: list[tuple[str, str]] = []
    post_chunks = answers.post_chunks

    async def held(*, token_id: int, task_id: str, chunks: list[Any]) -> bool:
        if task_id == slow.task_id and chunks[0]["data"] == "1":
            await release.wait()
        handled.append((task_id, chunks[0]["data"]))
        return await post_chunks(token_id=token_id, task_id=task_id, chunks=chunks)

    monkeypatch.setattr(answers, "post_chunks", held)

    def chunks(task_id: str, data: str, done: bool = False) -> str:
        chunk: dict[str, Any] = {"data": data, "done": True} if done else {"data": data}
        return json.dumps({"type": "chunks", "taskId": task_id, "chunks": [chunk]})

    await ws.send_to(text_data=chunks(slow.task_id, "1"))
    await ws.send_to(text_data=chunks(slow.task_id, "2"))
    await ws.send_to(text_data=chunks(quick.task_id, "[DONE]", done=True))
    # The other task's frame goes through while the first one's is held...
    event = await next_ev(quick, 5)
    assert event["chunks"] == [{"data": "[DONE]", "done": True}]
    assert handled == [(quick.task_id, "[DONE]")]
    # ...and the held task's second frame waits for its first.
    release.set()
    first, second = await next_ev(slow, 5), await next_ev(slow, 5)
    assert (first["chunks"][0]["data"], second["chunks"][0]["data"]) == ("1", "2")
    assert handled[1:] == [(slow.task_id, "1"), (slow.task_id, "2")]
    await ws.disconnect()


async def test_frames_received_before_the_close_are_handed_over_within_a_bound(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket closes while two answers are still being handed over: the one that
    finishes within FRAME_DRAIN_SECONDS reaches its client; the one that does not is
    dropped, and its client hears "publisher disconnected" when the session is unbound."""
    from virtual_llms import consumers

    monkeypatch.setattr(consumers, "FRAME_DRAIN_SECONDS", 0.5)
    ws, slow, stuck = await bound_with_two_tasks(tokens, streaming=False)
    post_result = answers.post_result

    async def held(*, token_id: int, task_id: str, status: int, body: Any) -> bool:
        await asyncio.sleep(0.2 if task_id == slow.task_id else 60)
        return await post_result(token_id=token_id, task_id=task_id, status=status, body=body)

    monkeypatch.setattr(answers, "post_result", held)
    for pending in (slow, stuck):
        frame = {"type": "result", "taskId": pending.task_id, "status": 200, "body": {"ok": 1}}
        await ws.send_to(text_data=json.dumps(frame))
    await ws.disconnect(timeout=5)
    assert answers.result_body(await next_ev(slow, 5)) == {"ok": 1}
    failed = await next_ev(stuck, 5)
    assert failed["kind"] == "error"
    assert failed["code"] == "publisher_disconnected"


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
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, raw: str, code: str
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
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, who: str, code: int
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

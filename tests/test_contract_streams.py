"""Contract: the publisher's control stream, SSE and WebSocket — the ready event, binding and
replacing, unbinding on close, a worker killed under the stream, the socket's own frames, and
large bodies both ways (PROTOCOL.md "The control stream: SSE or WebSocket")."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import httpx
import pytest
import websockets

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, chat_answer, chat_chunk
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    STREAM_W,
    Json,
    assert_api_error,
    assert_offline,
    assert_openai_error,
    assert_ws_refused,
    auth,
    chat_body,
    get_row,
    http,
    is_iso_with_zone,
    model_ids,
    parse_time,
    post_chat,
    prime,
    provider,
    publisher,
    sse_events,
    uname,
    wait_status,
)

pytestmark = pytest.mark.multiproc


async def roundtrip(pub: ContractPublisher, broker: Broker, name: str, text: str) -> None:
    """One request on worker 0 answered by ``pub`` through worker 2."""
    call = asyncio.create_task(post_chat(broker, chat_body(name, text), worker=CLIENT_W))
    frame = await pub.next_frame("infer")
    assert frame["body"]["messages"][0]["content"] == text
    posted = await pub.result(frame["taskId"], 200, chat_answer(text), url=broker.url(RESULT_W))
    assert posted.status_code == 204
    response = await asyncio.wait_for(call, 10.0)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == text


async def test_sse_stream_headers_and_ready_event(broker: Broker) -> None:
    name = uname("ready")
    async with publisher(broker, "sse", [provider(name)], connect=False) as pub:
        url = f"{broker.url(STREAM_W)}/api/v1/virtual/sessions/{pub.session_id}/stream"
        async with (
            http(pub.token) as client,
            client.stream("GET", url, timeout=httpx.Timeout(10.0)) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "no-cache" in response.headers.get("cache-control", "")
            assert response.headers.get("x-accel-buffering") == "no"
            lines: list[str] = []

            async def first_event() -> None:
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line == "" and any(x.startswith("data:") for x in lines):
                        return

            await asyncio.wait_for(first_event(), 5.0)
        ((event, data),) = sse_events("\n".join(lines) + "\n")
        assert event == "ready"
        assert json.loads(data) == {"providerSessionId": pub.session_id}


async def test_ws_ready_frame_first(broker: Broker) -> None:
    name = uname("wsready")
    async with publisher(broker, "ws", [provider(name)], connect=False) as pub:
        url = f"{broker.ws_url(STREAM_W)}/api/v1/virtual/sessions/{pub.session_id}/ws"
        async with websockets.connect(url, additional_headers=auth(pub.token)) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
        assert first == {"type": "ready", "providerSessionId": pub.session_id}


async def test_task_frames_carry_the_task_id(broker: Broker, transport: str) -> None:
    name = uname("frame")
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        assert frame["_event"] == "task"
        if transport == "sse":
            assert frame["_id"] == frame["taskId"]
        assert set(frame) - {"_event", "_id"} == {
            "kind",
            "taskId",
            "llmName",
            "streaming",
            "endpoint",
            "body",
        }
        await pub.result(frame["taskId"], 200, chat_answer("x"))
        assert (await asyncio.wait_for(call, 10.0)).status_code == 200


async def test_stream_for_unknown_session_is_404(broker: Broker) -> None:
    sid = f"unknown-{uname()}"
    async with http(broker.token("publisher")) as client:
        response = await client.get(
            f"{broker.url(1)}/api/v1/virtual/sessions/{sid}/stream", timeout=5.0
        )
    assert_api_error(response, 404)
    await assert_ws_refused(
        f"{broker.ws_url(1)}/api/v1/virtual/sessions/{sid}/ws",
        auth(broker.token("publisher")),
        404,
    )


@pytest.mark.parametrize(
    ("which", "first", "second"),
    [
        ("broker3", "sse", "sse"),
        ("broker3", "ws", "ws"),
        ("broker3", "sse", "ws"),
        ("broker3", "ws", "sse"),
        ("embedded", "sse", "sse"),
        ("embedded", "ws", "ws"),
    ],
)
async def test_second_stream_replaces_the_first(
    request: pytest.FixtureRequest, which: str, first: str, second: str
) -> None:
    broker = prime(cast(Broker, request.getfixturevalue(which)))
    name = uname("replace")
    async with publisher(broker, first, [provider(name)], worker=STREAM_W) as old:
        newer = ContractPublisher(broker.url(RESULT_W), old.token, transport=second)
        newer.session_id = old.session_id
        try:
            await newer.connect()
            await asyncio.wait_for(old.closed.wait(), 5.0)  # the old one is closed
            await asyncio.sleep(0.5)
            row = await get_row(broker, name)
            assert row is not None
            assert row["status"] == "active"
            assert row["providerSessionId"] == old.session_id
            await roundtrip(newer, broker, name, "to the new stream")
            assert not [f for f in old.seen if f.get("kind") == "infer"]
        finally:
            await newer.aclose()


async def test_closing_the_stream_makes_rows_inactive(broker: Broker, transport: str) -> None:
    a, h = uname("close-a"), uname("close-h")
    async with publisher(
        broker, transport, [provider(a), provider(h, status="hibernating")]
    ) as pub:
        await roundtrip(pub, broker, a, "before")
        await pub.disconnect()
        start = time.monotonic()
        await wait_status(broker, a, "inactive", timeout=5.0)
        await wait_status(broker, h, "inactive", timeout=5.0)
        assert time.monotonic() - start < 3.0, "rows must become inactive at once"
        for name in (a, h):
            row = await get_row(broker, name)
            assert row is not None
            assert is_iso_with_zone(row["inactiveSince"])
        assert not {a, h} & await model_ids(broker)
        response = await post_chat(broker, chat_body(a))
        assert_offline(response)


async def test_killed_worker_then_reconnect(broker3: Broker, transport: str) -> None:
    broker = broker3
    name = uname("killed")
    try:
        async with publisher(broker, transport, [provider(name)], worker=1) as pub:
            await roundtrip(pub, broker, name, "before the kill")
            broker.kill(1)  # SIGKILL: no cleanup runs on that worker
            await asyncio.wait_for(pub.closed.wait(), 10.0)
            for worker in (0, 2, 0):
                start = time.monotonic()
                response = await post_chat(broker, chat_body(name), worker=worker, timeout=10.0)
                elapsed = time.monotonic() - start
                assert_offline(response)
                assert elapsed < 2.5, f"503 took {elapsed:.2f} s"
            # The publisher reconnects, to another worker.
            assert (await pub.register([provider(name)], url=broker.url(2))).status_code == 200
            await pub.connect(url=broker.url(2))
            await roundtrip(pub, broker, name, "after the reconnect")
            await asyncio.sleep(2.0)  # nothing of the dead worker's binding comes back
            await roundtrip(pub, broker, name, "a while later")
            row = await get_row(broker, name)
            assert row is not None
            assert row["status"] == "active"
    finally:
        if broker.procs[1] is None:
            broker.start_worker(1)


MALFORMED: list[str | bytes] = [
    "this is not json",
    "[1, 2, 3]",
    '"a string"',
    "{}",
    '{"type": "no-such-type", "taskId": "x"}',
    '{"type": "result"}',
    '{"type": "result", "taskId": 12, "status": 200, "body": {}}',
    '{"type": "chunks", "taskId": "t", "chunks": "not a list"}',
    '{"type": "result", "taskId": "t", "status": "two hundred", "body": {}}',
    b"\x00\x01binary",
]


async def test_ws_malformed_frames_get_protocol_error_and_socket_stays_open(
    broker: Broker,
) -> None:
    name = uname("malformed")
    async with publisher(broker, "ws", [provider(name)]) as pub:
        for message in MALFORMED:
            await pub.send_ws_raw(message)
            reply = await pub.next_event("protocol_error", timeout=5.0)
            assert isinstance(reply.get("message"), str), reply
            assert reply["message"], reply
        assert not pub.closed.is_set()
        # The socket still works, for tasks and for results over it.
        call = asyncio.create_task(post_chat(broker, chat_body(name, "still there")))
        frame = await pub.next_frame("infer")
        await pub.send_ws(
            {"type": "result", "taskId": frame["taskId"], "status": 200, "body": chat_answer("yes")}
        )
        response = await asyncio.wait_for(call, 10.0)
        assert response.json() == chat_answer("yes")


async def test_ws_results_chunks_errors_and_heartbeat_over_the_socket(broker: Broker) -> None:
    name = uname("wsresults")
    async with publisher(broker, "ws", [provider(name)]) as pub:
        # result
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        answer = {"error": {"message": "nope", "type": "x", "code": None}}
        await pub.send_ws(
            {"type": "result", "taskId": frame["taskId"], "status": 400, "body": answer}
        )
        response = await asyncio.wait_for(call, 10.0)
        assert response.status_code == 400
        assert response.json() == answer
        # chunks, in several frames
        async with http(broker.token("client")) as client:

            async def stream() -> str:
                async with client.stream(
                    "POST",
                    f"{broker.url(CLIENT_W)}/v1/chat/completions",
                    json=chat_body(name, stream=True),
                ) as streamed:
                    assert streamed.status_code == 200
                    return (await streamed.aread()).decode()

            call_s = asyncio.create_task(stream())
            frame = await pub.next_frame("infer")
            datas = [chat_chunk(f"w{i}") for i in range(5)]
            await pub.send_ws(
                {
                    "type": "chunks",
                    "taskId": frame["taskId"],
                    "chunks": [{"data": d} for d in datas[:2]],
                }
            )
            await pub.send_ws(
                {
                    "type": "chunks",
                    "taskId": frame["taskId"],
                    "chunks": [{"data": d} for d in datas[2:]],
                }
            )
            await pub.send_ws(
                {
                    "type": "chunks",
                    "taskId": frame["taskId"],
                    "chunks": [{"data": "[DONE]", "done": True}],
                }
            )
            text = await asyncio.wait_for(call_s, 10.0)
        assert [d for _, d in sse_events(text)] == [*datas, "[DONE]"]
        # error
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        message = f"socket error {uname()}"
        await pub.send_ws({"type": "error", "taskId": frame["taskId"], "error": message})
        response = await asyncio.wait_for(call, 10.0)
        assert message in assert_openai_error(response, 502)["message"]
        # heartbeat
        before = await get_row(broker, name)
        assert before is not None
        await asyncio.sleep(0.05)
        await pub.send_ws({"type": "heartbeat", "providerSessionId": pub.session_id})

        async def bumped() -> bool:
            row = await get_row(broker, name)
            assert row is not None
            assert before is not None
            return parse_time(row["lastHeartbeatAt"]) > parse_time(before["lastHeartbeatAt"])

        deadline = time.monotonic() + 5.0
        while not await bumped():
            assert time.monotonic() < deadline, "a heartbeat over the socket bumped nothing"
            await asyncio.sleep(0.1)
        assert not [f for f in pub.seen if f.get("_event") == "protocol_error"]


def big_text(json_bytes: int) -> str:
    """Text whose JSON string (ASCII-escaped) takes about ``json_bytes`` bytes."""
    unit = '0123456789abcdef ünïcødé ✓ "quoted" \\ line\n'
    return unit * (json_bytes // (len(json.dumps(unit)) - 2))


async def big_stream(broker: Broker, name: str) -> str:
    async with (
        http(broker.token("client"), timeout=60.0) as client,
        client.stream(
            "POST",
            f"{broker.url(CLIENT_W)}/v1/chat/completions",
            json=chat_body(name, "small", stream=True),
        ) as streamed,
    ):
        return (await streamed.aread()).decode()


async def test_large_bodies_intact_both_ways(broker: Broker, transport: str) -> None:
    """A request close to MCPD_MAX_BODY_BYTES (10 MiB) reaches the publisher over either
    stream; a result and a chunk of a few MiB (posted by HTTP) reach the client."""
    name = uname("large")
    request_text = big_text(int(9.3 * 1024 * 1024))
    body: dict[str, Any] = chat_body(name, request_text)
    raw = json.dumps(body).encode()
    assert 9 * 1024 * 1024 < len(raw) < 10 * 1024 * 1024
    answer = chat_answer(big_text(4 * 1024 * 1024))
    async with publisher(broker, transport, [provider(name, model="big")]) as pub:
        call = asyncio.create_task(post_chat(broker, raw, timeout=60.0))
        frame = await pub.next_frame("infer", timeout=30.0)
        assert frame["body"]["messages"][0]["content"] == request_text
        assert frame["body"]["model"] == "big"
        posted = await pub.result(frame["taskId"], 200, answer, url=broker.url(RESULT_W))
        assert posted.status_code == 204
        response = await asyncio.wait_for(call, 60.0)
        assert response.status_code == 200
        assert response.json() == answer

        chunk = chat_chunk(big_text(2 * 1024 * 1024))
        call_s = asyncio.create_task(big_stream(broker, name))
        frame = await pub.next_frame("infer")
        chunks: list[Json] = [{"data": chunk}, {"data": "[DONE]", "done": True}]
        assert (await pub.chunks(frame["taskId"], chunks)).status_code == 204
        text = await asyncio.wait_for(call_s, 60.0)
        assert [d for _, d in sse_events(text)] == [chunk, "[DONE]"]


async def test_large_results_over_the_socket(broker: Broker) -> None:
    """A result of 4 MiB and a chunk of 2 MiB sent as WebSocket frames (one frame each, as
    a publisher's WebSocket library sends them) reach the client intact."""
    name = uname("large-ws")
    answer = chat_answer(big_text(4 * 1024 * 1024))
    async with publisher(broker, "ws", [provider(name)]) as pub:
        call = asyncio.create_task(post_chat(broker, chat_body(name), timeout=60.0))
        frame = await pub.next_frame("infer")
        await pub.send_ws(
            {"type": "result", "taskId": frame["taskId"], "status": 200, "body": answer}
        )
        response = await asyncio.wait_for(call, 60.0)
        assert response.status_code == 200
        assert response.json() == answer

        chunk = chat_chunk(big_text(2 * 1024 * 1024))
        call_s = asyncio.create_task(big_stream(broker, name))
        frame = await pub.next_frame("infer")
        chunks: list[Json] = [{"data": chunk}, {"data": "[DONE]", "done": True}]
        await pub.send_ws({"type": "chunks", "taskId": frame["taskId"], "chunks": chunks})
        text = await asyncio.wait_for(call_s, 60.0)
        assert [d for _, d in sse_events(text)] == [chunk, "[DONE]"]

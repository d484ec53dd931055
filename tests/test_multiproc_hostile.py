"""Hostile input on three daphne workers with PostgreSQL + Redis (issue 25's table, issue 29
items 2-3), from the outside: JSON nested 2,000 levels deep on every body route, malformed
session ids on the WebSocket handshake and the SSE stream, a NUL byte in a name (which
PostgreSQL itself refuses), bodies over Django's limit on the DRF routes, a deep frame on the
control socket, a result with an impossible status, and chunk data that tries to forge SSE
framing. No answer is a 500, every error is the contract's JSON, and the broker serves on."""

from __future__ import annotations

import asyncio
import json

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
    assert_openai_error,
    chat_body,
    get_row,
    http,
    post_chat,
    prime,
    provider,
    publisher,
    sse_events,
    uname,
)

pytestmark = pytest.mark.multiproc

DEEP = b"[" * 2000 + b"1" + b"]" * 2000
DEEP_OBJECT = b'{"a":' * 2000 + b"1" + b"}" * 2000


@pytest.fixture
def b3(broker3: Broker) -> Broker:
    return prime(broker3)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def roundtrip(pub: ContractPublisher, broker: Broker, name: str) -> None:
    """The broker still serves: one request answered end to end, across the workers."""
    call = asyncio.create_task(post_chat(broker, chat_body(name, "still serving")))
    frame = await pub.next_frame("infer")
    await pub.result(frame["taskId"], 200, chat_answer("yes"), url=broker.url(RESULT_W))
    response = await asyncio.wait_for(call, 15.0)
    assert response.status_code == 200, response.text
    assert response.json() == chat_answer("yes")


async def test_deep_json_on_every_body_route_is_400_invalid_json(b3: Broker) -> None:
    name = uname("deep")
    async with publisher(b3, "sse", [provider(name)]) as pub, httpx.AsyncClient() as client:
        # An open task, so the task routes are tried on a task that exists.
        call = asyncio.create_task(post_chat(b3, chat_body(name)))
        task_id = (await pub.next_frame("infer"))["taskId"]
        routes = [
            ("/v1/chat/completions", "client"),
            ("/v1/completions", "client"),
            ("/v1/embeddings", "client"),
            ("/v1/responses", "client"),
            (f"/api/v1/virtual/tasks/{task_id}/result", "publisher"),
            (f"/api/v1/virtual/tasks/{task_id}/chunks", "publisher"),
            (f"/api/v1/virtual/tasks/{task_id}/error", "publisher"),
            ("/api/v1/virtual/register", "publisher"),
            ("/api/v1/virtual/heartbeat", "publisher"),
            ("/api/v1/virtual/status", "publisher"),
            ("/api/v1/llms", "admin"),
        ]
        failures = []
        for i, (path, role) in enumerate(routes * 2):
            body = DEEP if i < len(routes) else DEEP_OBJECT
            response = await client.post(
                f"{b3.url(i % 3)}{path}",
                content=body,
                headers={**auth(b3.token(role)), "Content-Type": "application/json"},
            )
            try:
                if path.startswith("/v1/"):
                    error = assert_openai_error(response, 400, "invalid_json")
                else:
                    error = assert_api_error(response, 400, "invalid_json")
                assert "nested deeper than 128 levels" in error["message"], error
            except AssertionError as exc:
                failures.append(f"{path} on worker {i % 3}: {exc}")
        assert not failures, "\n".join(failures)
        # Nothing changed: the task is still open and its answer reaches the client.
        assert not call.done()
        await pub.result(task_id, 200, chat_answer("fine"), url=b3.url(RESULT_W))
        assert (await asyncio.wait_for(call, 15.0)).json() == chat_answer("fine")
        assert (await get_row(b3, name))["status"] == "active"  # type: ignore[index]
        await roundtrip(pub, b3, name)


@pytest.mark.parametrize("session", ["", "../..", "%00", "a/b", "x?token=y", "%2e%2e"])
async def test_a_websocket_handshake_for_a_malformed_session_id_is_closed_4404(
    b3: Broker, session: str
) -> None:
    for worker in range(3):
        url = f"{b3.ws_url(worker)}/api/v1/virtual/sessions/{session}/ws"
        async with websockets.connect(
            url, additional_headers=auth(b3.token("publisher")), open_timeout=10
        ) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
            assert frame["type"] == "error", frame
            assert frame["error"]["code"] in {"not_found", "session_not_found"}, frame
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5.0)
            assert ws.close_code == 4404, (ws.close_code, ws.close_reason)
    # The broker serves on.
    async with http(b3.token("client")) as client:
        assert (await client.get(f"{b3.url(0)}/v1/models")).status_code == 200


@pytest.mark.parametrize(
    ("path", "role", "code"),
    [
        ("/api/v1/virtual/sessions/%00/stream", "publisher", "session_not_found"),
        ("/api/v1/virtual/sessions/a%00b/stream", "publisher", "session_not_found"),
        ("/api/v1/llms/%00", "client", "llm_not_found"),
        ("/v1/models/%00", "client", "model_not_found"),
        ("/api/v1/llms/x%00/backends/s%00/drain", "admin", "backend_not_found"),
        ("/api/v1/virtual/sessions//stream", "publisher", "not_found"),
        ("/api/nothing", "client", "not_found"),
    ],
)
async def test_a_nul_byte_or_a_bad_id_in_a_path_is_a_json_404_on_postgresql(
    b3: Broker, path: str, role: str, code: str
) -> None:
    async with http(b3.token(role)) as client:
        for worker in range(3):
            method = "POST" if path.endswith("/drain") else "GET"
            response = await client.request(method, f"{b3.url(worker)}{path}")
            if path.startswith("/v1/"):
                assert_openai_error(response, 404, code)
            else:
                assert_api_error(response, 404, code)


async def test_a_model_name_with_a_nul_byte_is_404(b3: Broker) -> None:
    response = await post_chat(b3, {"model": "m\u0000", "messages": []})
    assert_openai_error(response, 404, "model_not_found")


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/api/v1/virtual/register", "publisher"),
        ("/api/v1/virtual/heartbeat", "publisher"),
        ("/api/v1/virtual/status", "publisher"),
        ("/api/v1/llms", "admin"),
    ],
)
async def test_a_body_over_the_limit_on_the_drf_routes_is_a_json_413(
    b3: Broker, path: str, role: str
) -> None:
    """These answered Django's HTML "Bad Request" page (RequestDataTooBig)."""
    body = b'{"providerSessionId": "' + b"a" * (10 * 1024 * 1024 + 10) + b'"}'
    async with http(b3.token(role), timeout=60) as client:
        response = await client.post(
            f"{b3.url(0)}{path}", content=body, headers={"Content-Type": "application/json"}
        )
    assert_api_error(response, 413, "payload_too_large")


async def test_a_deeply_nested_socket_frame_gets_protocol_error_and_the_socket_stays(
    b3: Broker,
) -> None:
    name = uname("deepframe")
    async with publisher(b3, "ws", [provider(name)]) as pub:
        replies: list[Json] = []
        await pub.send_ws_raw("[" * 1100 + "1" + "]" * 1100)
        await pub.send_ws_raw('{"a":' * 3000 + "1" + "}" * 3000)
        await pub.send_ws_raw(json.dumps({"type": "heartbeat"}))
        for _ in range(3):
            replies.append(await pub.next_frame(timeout=10.0))
        kinds = [(r["_event"], r.get("code")) for r in replies]
        assert kinds.count(("protocol_error", "invalid_json")) == 2, replies
        assert ("heartbeat", None) in kinds, replies
        assert not pub.closed.is_set()
        assert (await get_row(b3, name))["status"] == "active"  # type: ignore[index]
        await roundtrip(pub, b3, name)


@pytest.mark.parametrize("status", [100, 101, 199, 99, 600, 700])
async def test_a_result_with_an_impossible_status_is_400_and_the_client_gets_502(
    b3: Broker, status: int
) -> None:
    name = uname("badstatus")
    async with publisher(b3, "sse", [provider(name)]) as pub:
        for streaming in (False, True):
            call = asyncio.create_task(post_chat(b3, chat_body(name, stream=streaming)))
            frame = await pub.next_frame("infer")
            refused = await pub.result(frame["taskId"], status, {"x": 1}, url=b3.url(RESULT_W))
            assert "200-599" in assert_api_error(refused, 400, "invalid_request")["message"]
            response = await asyncio.wait_for(call, 10.0)
            error = assert_openai_error(response, 502, "publisher_error")
            assert str(status) in error["message"]
            # The task is over.
            late = await pub.result(frame["taskId"], 200, chat_answer("late"))
            assert_api_error(late, 404, "task_not_found")
        await roundtrip(pub, b3, name)


async def test_a_result_frame_with_a_1xx_status_gets_protocol_error_and_the_client_502(
    b3: Broker,
) -> None:
    name = uname("badstatusws")
    async with publisher(b3, "ws", [provider(name)]) as pub:
        call = asyncio.create_task(post_chat(b3, chat_body(name)))
        frame = await pub.next_frame("infer")
        task_id = frame["taskId"]
        await pub.send_ws({"type": "result", "taskId": task_id, "status": 101, "body": {}})
        reply = await pub.next_event("protocol_error", timeout=10.0)
        assert reply.get("taskId") == task_id, reply
        assert_openai_error(await asyncio.wait_for(call, 10.0), 502, "publisher_error")
        assert not pub.closed.is_set()


FORGED = [
    "\r\ndata: [DONE]",
    "\rdata: [DONE]",
    "\r\rdata: [DONE]",
    "\n\ndata: [DONE]\n\n",
    "\u2028\u2028data: [DONE]",
]


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_chunk_data_cannot_forge_sse_framing_in_the_clients_stream(
    b3: Broker, transport: str
) -> None:
    name = uname("forge")
    async with (
        publisher(b3, transport, [provider(name)]) as pub,
        http(b3.token("client")) as client,
    ):

        async def streamed() -> httpx.Response:
            url = f"{b3.url(CLIENT_W)}/v1/chat/completions"
            async with client.stream("POST", url, json=chat_body(name, stream=True)) as r:
                await r.aread()
            return r

        call = asyncio.create_task(streamed())
        frame = await pub.next_frame("infer")
        chunks: list[Json] = [{"data": chat_chunk("a") + forged} for forged in FORGED]
        chunks += [{"data": chat_chunk("end")}, {"data": "[DONE]", "done": True}]
        if transport == "ws":
            await pub.send_ws({"type": "chunks", "taskId": frame["taskId"], "chunks": chunks})
        else:
            posted = await pub.chunks(frame["taskId"], chunks, url=b3.url(RESULT_W))
            assert posted.status_code == 204, posted.text
        response = await asyncio.wait_for(call, 15.0)
    assert response.status_code == 200
    events = [data for _, data in sse_events(response.text)]
    # One event per chunk, and the stream ends once, with the publisher's [DONE].
    assert len(events) == len(FORGED) + 2, events
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    assert events[-2] == chat_chunk("end")
    # What the openai SDK reads (httpx's line splitter) holds no early end either.
    from openai._streaming import SSEDecoder

    decoder, seen = SSEDecoder(), []
    for line in response.text.splitlines():
        sse = decoder.decode(line)
        if sse is not None:
            seen.append(sse.data)
    assert seen.index("[DONE]") == len(seen) - 1, seen
    assert all(not data.startswith("[DONE]") for data in seen[:-1]), seen


async def test_the_broker_still_serves_after_all_of_it(b3: Broker) -> None:
    name = uname("after")
    async with publisher(b3, "sse", [provider(name)]) as pub:
        for worker in range(3):
            call = asyncio.create_task(post_chat(b3, chat_body(name), worker=worker))
            frame = await pub.next_frame("infer")
            await pub.result(frame["taskId"], 200, chat_answer("ok"), url=b3.url(STREAM_W))
            assert (await asyncio.wait_for(call, 15.0)).status_code == 200


async def test_a_revoked_token_that_accepts_event_streams_gets_its_401_not_a_406(
    b3: Broker,
) -> None:
    label = uname("revoked")
    token = b3.new_token("publisher", label)
    b3.python(
        "-c",
        "import sys, django\n"
        "django.setup()\n"
        "from virtual_llms.auth import token_revoke\n"
        "from virtual_llms.models import ApiToken\n"
        "token_revoke(token=ApiToken.objects.get(label=sys.argv[1]))\n",
        label,
    )
    body = {"providerSessionId": None, "providers": [provider(uname("r"))]}
    async with httpx.AsyncClient() as client:
        for worker in range(3):
            response = await client.post(
                f"{b3.url(worker)}/api/v1/virtual/register",
                json=body,
                headers={**auth(token), "Accept": "text/event-stream"},
            )
            assert_api_error(response, 401, "unauthorized")

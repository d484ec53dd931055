"""Contract: the client API's error table, and results that must change nothing (PROTOCOL.md
"Client API" table, "Task results": unknown / finished / cancelled / foreign task ids)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest

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
    chat_body,
    get_row,
    http,
    post_chat,
    prime,
    provider,
    publisher,
    sdk,
    sdk_error_code,
    sdk_error_message,
    sse_events,
    uname,
    wait_status,
)
from tests.services_up import services_up

pytestmark = pytest.mark.multiproc

MAX_BODY = 256 * 1024
INFER_TIMEOUT = 3.0
WAKE_TIMEOUT = 2.0
SHORT_ENV = {
    "MCPD_INFER_TIMEOUT_SECONDS": str(INFER_TIMEOUT),
    "MCPD_WAKE_TIMEOUT_SECONDS": str(WAKE_TIMEOUT),
    "MCPD_MAX_BODY_BYTES": str(MAX_BODY),
}


@pytest.fixture(scope="module")
def short3() -> Iterator[Broker]:
    """Three workers on PostgreSQL + Redis with short timeouts and a small body limit."""
    ok, why = services_up()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL + Redis tests, but: {why}")
        pytest.skip(f"needs PostgreSQL + Redis: {why}")
    broker = Broker(3, services=True, env=SHORT_ENV).start()
    yield prime(broker)
    broker.stop()


@pytest.fixture(scope="module")
def short_embedded() -> Iterator[Broker]:
    broker = Broker(1, services=False, env=SHORT_ENV).start()
    yield prime(broker)
    broker.stop()


@pytest.fixture(params=["short3", "short_embedded"])
def short(request: pytest.FixtureRequest) -> Broker:
    return prime(cast(Broker, request.getfixturevalue(request.param)))


async def roundtrip(pub: ContractPublisher, broker: Broker, name: str) -> None:
    """The broker still serves: one request answered end to end."""
    call = asyncio.create_task(post_chat(broker, chat_body(name, "still serving")))
    frame = await pub.next_frame("infer")
    assert frame["body"]["messages"][0]["content"] == "still serving"
    await pub.result(frame["taskId"], 200, chat_answer("yes"), url=broker.url(RESULT_W))
    response = await asyncio.wait_for(call, 10.0)
    assert response.status_code == 200, response.text
    assert response.json() == chat_answer("yes")


async def stream_text(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    async with client.stream("POST", url, json=body) as response:
        await response.aread()
    return response


# --- 404 -----------------------------------------------------------------------------------------


async def test_unknown_model_is_404_model_not_found(broker: Broker) -> None:
    name = uname("missing")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", chat_body(name)),
        ("/v1/chat/completions", chat_body(name, stream=True)),
        ("/v1/completions", {"model": name, "prompt": "x"}),
        ("/v1/embeddings", {"model": name, "input": "x"}),
    ]
    for worker, (endpoint, body) in enumerate(cases):
        response = await post_chat(broker, body, endpoint=endpoint, worker=worker)
        assert_openai_error(response, 404, "model_not_found")
    async with sdk(broker) as client:
        with pytest.raises(openai.NotFoundError) as failed:
            await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "x"}]
            )
    assert failed.value.status_code == 404
    assert sdk_error_code(failed.value) == "model_not_found"


# --- 503 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["inactive-row", "registered-no-stream", "stream-closed"])
async def test_offline_is_503_with_retry_after_within_2s(broker: Broker, case: str) -> None:
    name, keep = uname("offline"), uname("offline-keep")
    async with publisher(
        broker, "sse", [provider(name), provider(keep)], connect=case != "registered-no-stream"
    ) as pub:
        if case == "inactive-row":
            assert (await pub.register([provider(keep)])).status_code == 200
        elif case == "stream-closed":
            await pub.disconnect()
            await wait_status(broker, name, "inactive")
        for worker, body in enumerate(
            [chat_body(name), chat_body(name, stream=True), chat_body(name)]
        ):
            start = time.monotonic()
            response = await post_chat(broker, body, worker=worker, timeout=15.0)
            elapsed = time.monotonic() - start
            assert_offline(response)
            assert elapsed < 2.5, f"{case}: 503 took {elapsed:.2f} s"
        assert not [f for f in pub.seen if f.get("kind") == "infer"]
        async with sdk(broker) as client:
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "x"}]
                )
        assert failed.value.status_code == 503
        assert sdk_error_code(failed.value) == "publisher_offline"


# --- 502 -----------------------------------------------------------------------------------------


async def test_stream_closed_mid_task_is_502_publisher_disconnected(
    broker: Broker, transport: str
) -> None:
    name = uname("gone")
    async with publisher(broker, transport, [provider(name)]) as pub:
        calls = [
            asyncio.create_task(post_chat(broker, chat_body(name), worker=0)),
            asyncio.create_task(post_chat(broker, chat_body(name, stream=True), worker=2)),
        ]
        await pub.next_frame("infer")
        await pub.next_frame("infer")
        await pub.disconnect()
        start = time.monotonic()
        responses = await asyncio.wait_for(asyncio.gather(*calls), 10.0)
        assert time.monotonic() - start < 5.0
    for response in responses:
        # The streamed request had no chunk yet: it gets the status, like the other one.
        assert_openai_error(response, 502, "publisher_disconnected")


async def test_posted_error_is_502_with_its_message(broker: Broker, transport: str) -> None:
    name = uname("err")
    message = f"CUDA out of memory ({uname('tag')})"
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        posted = await pub.error(frame["taskId"], message, url=broker.url(RESULT_W))
        assert posted.status_code == 204
        assert posted.content == b""
        response = await asyncio.wait_for(call, 10.0)
        assert message in assert_openai_error(response, 502)["message"]
        # Streamed request, error before the first chunk; and through the SDK.
        call = asyncio.create_task(post_chat(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        await pub.error(frame["taskId"], message, url=broker.url(0))
        response = await asyncio.wait_for(call, 10.0)
        assert message in assert_openai_error(response, 502)["message"]
        async with sdk(broker) as client:
            sdk_call = asyncio.create_task(
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "x"}]
                )
            )
            frame = await pub.next_frame("infer")
            await pub.error(frame["taskId"], message, url=broker.url(1))
            with pytest.raises(openai.APIStatusError) as failed:
                await asyncio.wait_for(sdk_call, 10.0)
        assert failed.value.status_code == 502
        assert message in sdk_error_message(failed.value)
        assert (await pub.error(frame["taskId"], "again")).status_code == 404
        await roundtrip(pub, broker, name)


# --- 504 and cancel ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "streaming", "transport"),
    [
        ("short3", False, "sse"),
        ("short3", False, "ws"),
        ("short_embedded", False, "sse"),
        ("short3", True, "sse"),
    ],
)
async def test_no_result_in_time_is_504_and_a_cancel_frame(
    request: pytest.FixtureRequest, which: str, streaming: bool, transport: str
) -> None:
    short = prime(cast(Broker, request.getfixturevalue(which)))
    name = uname("slow")
    async with publisher(short, transport, [provider(name)]) as pub:
        start = time.monotonic()
        response_task = asyncio.create_task(
            post_chat(short, chat_body(name, stream=streaming), timeout=30.0)
        )
        frame = await pub.next_frame("infer")
        response = await asyncio.wait_for(response_task, 30.0)
        elapsed = time.monotonic() - start
        assert_openai_error(response, 504)
        assert INFER_TIMEOUT - 0.5 < elapsed < INFER_TIMEOUT + 2.5, elapsed
        cancel = await pub.next_frame("cancel", timeout=5.0)
        assert cancel["taskId"] == frame["taskId"]
        late = await pub.result(frame["taskId"], 200, chat_answer("too late"), url=short.url(2))
        assert late.status_code == 404
        await roundtrip(pub, short, name)


@pytest.mark.parametrize(("which", "transport"), [("short3", "sse"), ("short_embedded", "ws")])
async def test_wake_not_in_time_is_504_and_a_cancel_frame(
    request: pytest.FixtureRequest, which: str, transport: str
) -> None:
    short = prime(cast(Broker, request.getfixturevalue(which)))
    name = uname("slowwake")
    async with publisher(short, transport, [provider(name, status="hibernating")]) as pub:
        start = time.monotonic()
        call = asyncio.create_task(post_chat(short, chat_body(name), timeout=30.0))
        wake = await pub.next_frame("wake")
        assert wake["llmName"] == name
        response = await asyncio.wait_for(call, 20.0)
        assert_openai_error(response, 504)
        assert WAKE_TIMEOUT - 0.5 < time.monotonic() - start < WAKE_TIMEOUT + 2.5
        cancel = await pub.next_frame("cancel", timeout=5.0)
        assert cancel["taskId"] == wake["taskId"]
        row = await get_row(short, name)
        assert row is not None
        assert row["status"] == "hibernating"
        assert (await pub.result(wake["taskId"], 200, {}, url=short.url(1))).status_code == 404
        assert not [f for f in pub.seen if f.get("kind") == "infer"]


async def test_client_disconnect_sends_cancel_and_later_results_404(
    broker: Broker, transport: str
) -> None:
    name = uname("bye")
    async with publisher(broker, transport, [provider(name)]) as pub:
        # A client waiting for a whole answer goes away.
        async def wait_whole() -> None:
            async with http(broker.token("client")) as client:
                await client.post(
                    f"{broker.url(CLIENT_W)}/v1/chat/completions", json=chat_body(name)
                )

        waiting = asyncio.create_task(wait_whole())
        frame = await pub.next_frame("infer")
        await asyncio.sleep(0.2)
        start = time.monotonic()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        cancel = await pub.next_frame("cancel", timeout=5.0)
        assert time.monotonic() - start < 2.0
        assert cancel["taskId"] == frame["taskId"]
        assert set(cancel) - {"_event", "_id"} == {"kind", "taskId"}
        for worker in range(broker.n):
            url = broker.url(worker)
            assert (await pub.result(frame["taskId"], 200, {}, url=url)).status_code == 404
            assert (await pub.error(frame["taskId"], "x", url=url)).status_code == 404

        # A client reading a stream goes away after the first chunk.
        got_first = asyncio.Event()

        async def read_stream() -> None:
            async with (
                http(broker.token("client")) as client,
                client.stream(
                    "POST",
                    f"{broker.url(CLIENT_W)}/v1/chat/completions",
                    json=chat_body(name, stream=True),
                ) as response,
            ):
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        got_first.set()

        reading = asyncio.create_task(read_stream())
        frame = await pub.next_frame("infer")
        await pub.chunks(frame["taskId"], [{"data": chat_chunk("one")}], url=broker.url(2))
        await asyncio.wait_for(got_first.wait(), 5.0)
        start = time.monotonic()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        cancel = await pub.next_frame("cancel", timeout=5.0)
        assert time.monotonic() - start < 2.0
        assert cancel["taskId"] == frame["taskId"]
        late = await pub.chunks(frame["taskId"], [{"data": chat_chunk("two")}], url=broker.url(0))
        assert late.status_code == 404
        await roundtrip(pub, broker, name)


# --- 400 / 413 -----------------------------------------------------------------------------------

BAD_REQUESTS: list[bytes | dict[str, Any]] = [
    b'{"model": "x", "messages": [',
    b"",
    b"not json at all",
    b"[]",
    b'"just a string"',
    b"null",
    {"messages": [{"role": "user", "content": "no model"}]},
    {"model": None, "messages": []},
    {"model": 42, "messages": []},
    {"model": ["a", "b"], "messages": []},
]


async def test_bad_requests_are_400_and_the_server_goes_on(broker: Broker) -> None:
    name = uname("bad")
    async with publisher(broker, "sse", [provider(name)]) as pub:
        for endpoint in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            for i, bad in enumerate(BAD_REQUESTS):
                body = json.dumps(bad).encode() if isinstance(bad, dict) else bad
                response = await post_chat(broker, body, endpoint=endpoint, worker=i % 3)
                assert response.status_code == 400, (endpoint, bad, response.text)
                assert_openai_error(response, 400)
        assert not [f for f in pub.seen if f.get("kind") == "infer"]
        await roundtrip(pub, broker, name)


async def test_body_over_the_limit_is_413_and_the_server_goes_on(short: Broker) -> None:
    name = uname("huge")
    async with publisher(short, "sse", [provider(name)]) as pub:
        too_big = json.dumps(chat_body(name, "x" * (MAX_BODY + 1024))).encode()
        for worker, endpoint in enumerate(("/v1/chat/completions", "/v1/embeddings")):
            response = await post_chat(short, too_big, endpoint=endpoint, worker=worker)
            assert_openai_error(response, 413)
        streamed = json.dumps(chat_body(name, "x" * (MAX_BODY + 1024), stream=True)).encode()
        assert_openai_error(await post_chat(short, streamed, worker=2), 413)
        assert not [f for f in pub.seen if f.get("kind") == "infer"]
        # Just under the limit is served, intact.
        text = "y" * (MAX_BODY - 1024)
        call = asyncio.create_task(post_chat(short, chat_body(name, text)))
        frame = await pub.next_frame("infer")
        assert frame["body"]["messages"][0]["content"] == text
        await pub.result(frame["taskId"], 200, chat_answer("fits"), url=short.url(1))
        response = await asyncio.wait_for(call, 10.0)
        assert response.status_code == 200
        assert response.json() == chat_answer("fits")
        await roundtrip(pub, short, name)


# --- results that must change nothing ------------------------------------------------------------


async def test_spoofed_results_are_404_and_the_real_answer_wins(
    broker: Broker, transport: str
) -> None:
    name = uname("victim")
    stranger_token = broker.new_token("publisher")
    async with (
        publisher(broker, transport, [provider(name)]) as pub,
        publisher(broker, transport, [provider(uname("stranger"))], token=stranger_token) as evil,
    ):
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        task_id = frame["taskId"]
        for worker in range(broker.n):
            url = broker.url(worker)
            assert_api_error(await evil.result(task_id, 200, chat_answer("EVIL"), url=url), 404)
            assert_api_error(await evil.chunks(task_id, [{"data": "EVIL"}], url=url), 404)
            assert_api_error(await evil.error(task_id, "EVIL", url=url), 404)
        if transport == "ws":
            await evil.send_ws(
                {"type": "result", "taskId": task_id, "status": 200, "body": chat_answer("EVIL")}
            )
            await evil.send_ws({"type": "error", "taskId": task_id, "error": "EVIL"})
        unknown = f"no-such-task-{uname()}"
        assert_api_error(await pub.result(unknown, 200, {}, url=broker.url(0)), 404)
        assert_api_error(await pub.chunks(unknown, [{"data": "x"}], url=broker.url(1)), 404)
        assert_api_error(await pub.error(unknown, "x", url=broker.url(2)), 404)
        await asyncio.sleep(0.3)
        assert not call.done(), "a refused result must not end the task"
        posted = await pub.result(task_id, 200, chat_answer("real"), url=broker.url(RESULT_W))
        assert posted.status_code == 204
        response = await asyncio.wait_for(call, 10.0)
        assert response.status_code == 200
        assert response.json() == chat_answer("real")
        # Finished: everything further is refused.
        assert_api_error(await pub.result(task_id, 200, chat_answer("again")), 404)
        assert_api_error(await pub.chunks(task_id, [{"data": "again"}]), 404)
        assert_api_error(await pub.error(task_id, "again"), 404)


async def test_spoofed_chunks_never_reach_the_stream(broker: Broker) -> None:
    name = uname("victim-stream")
    stranger_token = broker.new_token("publisher")
    async with (
        publisher(broker, "sse", [provider(name)]) as pub,
        http(broker.token("client")) as client,
    ):
        evil = ContractPublisher(broker.url(STREAM_W), stranger_token)
        try:
            call = asyncio.create_task(
                stream_text(
                    client,
                    f"{broker.url(CLIENT_W)}/v1/chat/completions",
                    chat_body(name, stream=True),
                )
            )
            frame = await pub.next_frame("infer")
            evil_chunks: list[Json] = [
                {"data": chat_chunk("EVIL")},
                {"data": "[DONE]", "done": True},
            ]
            assert_api_error(await evil.chunks(frame["taskId"], evil_chunks), 404)
            assert_api_error(await evil.result(frame["taskId"], 500, {"e": 1}), 404)
            real: list[Json] = [{"data": chat_chunk("real")}, {"data": "[DONE]", "done": True}]
            assert (await pub.chunks(frame["taskId"], real, url=broker.url(2))).status_code == 204
            response = await asyncio.wait_for(call, 10.0)
        finally:
            await evil.aclose()
    assert response.status_code == 200
    text = response.text
    assert "EVIL" not in text
    assert [d for _, d in sse_events(text)] == [chat_chunk("real"), "[DONE]"]


BAD_RESULT_BODIES: list[tuple[str, Any]] = [
    ("result", b'{"status": 200, "body": '),
    ("result", {"body": {"x": 1}}),
    ("result", {"status": "200", "body": {}}),
    ("result", {"status": 200.5, "body": {}}),
    # (An integer status outside 200-599 is refused and ends the task with a 502 for its
    # client: tests/test_multiproc_hostile.py.)
    ("result", [200]),
    ("chunks", {"chunks": "data: x"}),
    ("chunks", {"chunks": [{"nodata": 1}]}),
    ("chunks", {"chunks": [{"data": 5}]}),
    ("chunks", {}),
    ("error", {}),
    ("error", {"error": {"nested": True}}),
]


async def test_bad_result_bodies_are_400_and_change_nothing(broker: Broker) -> None:
    name = uname("badresult")
    async with publisher(broker, "sse", [provider(name)]) as pub, http(pub.token) as client:
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame("infer")
        failures: list[str] = []
        for i, (what, bad) in enumerate(BAD_RESULT_BODIES):
            url = f"{broker.url(i % 3)}/api/v1/virtual/tasks/{frame['taskId']}/{what}"
            if isinstance(bad, bytes):
                response = await client.post(
                    url, content=bad, headers={"Content-Type": "application/json"}
                )
            else:
                response = await client.post(url, json=bad)
            if response.status_code != 400:
                failures.append(f"{what} {bad!r}: {response.status_code} {response.text[:200]}")
            if call.done():
                failures.append(f"{what} {bad!r} ended the task")
                break
        assert not failures, "\n".join(failures)
        posted = await pub.result(frame["taskId"], 200, chat_answer("good"), url=broker.url(2))
        assert posted.status_code == 204
        response = await asyncio.wait_for(call, 10.0)
        assert response.json() == chat_answer("good")

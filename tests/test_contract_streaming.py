"""Contract: streamed inference (``"stream": true``) — chunks in order, ``data: [DONE]`` at the
end, an explicit error instead of [DONE] when the publisher fails mid-stream, and a refusal
before streaming passed through as a plain status (PROTOCOL.md "Task results")."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import httpx
import openai
import pytest

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, Frame, chat_chunk
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    chat_body,
    http,
    post_chat,
    provider,
    publisher,
    sdk,
    sse_events,
    uname,
)

pytestmark = pytest.mark.multiproc

DONE = {"data": "[DONE]", "done": True}


async def post_chunks(
    pub: ContractPublisher, broker: Broker, task_id: str, chunks: list[dict[str, Any]], worker: int
) -> None:
    response = await pub.chunks(task_id, chunks, url=broker.url(worker))
    assert response.status_code == 204, (response.status_code, response.text)


async def stream_raw(
    broker: Broker,
    body: dict[str, Any],
    *,
    worker: int = CLIENT_W,
    endpoint: str = "/v1/chat/completions",
) -> tuple[httpx.Response, str]:
    """A streamed client request read to its end: (response, the whole text)."""
    async with (
        http(broker.token("client")) as client,
        client.stream("POST", f"{broker.url(worker)}{endpoint}", json=body) as response,
    ):
        text = (await response.aread()).decode()
    return response, text


def error_of(data: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return cast(dict[str, Any], parsed["error"])
    return None


async def test_sdk_stream_iterates_chunks_in_order(broker: Broker, transport: str) -> None:
    name = uname("stream")
    pieces = ["Hel", "lo", ", ", "wör", "ld ✓"]
    async with (
        publisher(broker, transport, [provider(name, model="up-stream")]) as pub,
        sdk(broker) as client,
    ):

        async def consume() -> list[str | None]:
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return [chunk.choices[0].delta.content async for chunk in stream]

        call = asyncio.create_task(consume())
        frame = await pub.next_frame("infer")
        assert frame["streaming"] is True
        assert frame["endpoint"] == "/v1/chat/completions"
        assert frame["body"]["stream"] is True
        assert frame["body"]["model"] == "up-stream"
        task_id = frame["taskId"]
        # One POST after another, to different workers.
        await post_chunks(pub, broker, task_id, [{"data": chat_chunk(p)} for p in pieces[:2]], 2)
        await post_chunks(pub, broker, task_id, [{"data": chat_chunk(pieces[2])}], 0)
        await post_chunks(
            pub,
            broker,
            task_id,
            [{"data": chat_chunk(p)} for p in pieces[3:]]
            + [{"data": chat_chunk("", finish=True)}, DONE],
            1,
        )
        got = await asyncio.wait_for(call, 10.0)
    assert got == [*pieces, None]


async def test_raw_stream_is_event_stream_ending_with_done(broker: Broker, transport: str) -> None:
    name = uname("rawstream")
    datas = [chat_chunk(f"t{i}") for i in range(120)]
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        for start in range(0, len(datas), 12):
            batch = [{"data": d} for d in datas[start : start + 12]]
            await post_chunks(pub, broker, frame["taskId"], batch, (start // 12) % 3)
        await post_chunks(pub, broker, frame["taskId"], [DONE], RESULT_W)
        response, text = await asyncio.wait_for(call, 20.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(text)
    assert [data for _, data in events] == [*datas, "[DONE]"]
    for data in datas[:3]:
        assert f"data: {data}\n\n" in text
    assert text.rstrip("\n").endswith("data: [DONE]")


async def test_streamed_completions(broker: Broker) -> None:
    name = uname("cmplstream")
    async with publisher(broker, "sse", [provider(name)]) as pub, sdk(broker) as client:

        async def consume() -> list[str]:
            stream = await client.completions.create(model=name, prompt="count:", stream=True)
            return [chunk.choices[0].text async for chunk in stream]

        call = asyncio.create_task(consume())
        frame = await pub.next_frame("infer")
        assert frame["endpoint"] == "/v1/completions"
        assert frame["streaming"] is True
        chunks = [
            {
                "data": json.dumps(
                    {
                        "id": "c",
                        "object": "text_completion",
                        "created": 1,
                        "model": "m",
                        "choices": [
                            {"index": 0, "text": t, "finish_reason": None, "logprobs": None}
                        ],
                    }
                )
            }
            for t in (" one", " two", " three")
        ]
        await post_chunks(pub, broker, frame["taskId"], [*chunks, DONE], RESULT_W)
        assert await asyncio.wait_for(call, 10.0) == [" one", " two", " three"]


async def test_publisher_dying_mid_stream_ends_in_an_error(broker: Broker, transport: str) -> None:
    name = uname("dies")
    sent = [chat_chunk("first"), chat_chunk("second")]
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        await post_chunks(pub, broker, frame["taskId"], [{"data": d} for d in sent], RESULT_W)
        await asyncio.sleep(0.3)
        await pub.disconnect()  # the publisher dies
        response, text = await asyncio.wait_for(call, 10.0)
    assert response.status_code == 200
    datas = [data for _, data in sse_events(text)]
    assert "[DONE]" not in datas, text
    assert datas[: len(sent)] == sent, text
    assert len(datas) == len(sent) + 1, f"expected the chunks then one error event: {text!r}"
    error = error_of(datas[-1])
    assert error is not None, f"the stream must end in an explicit error: {text!r}"
    assert "disconnect" in json.dumps(error).lower(), error


async def test_sdk_sees_an_error_when_the_publisher_dies(broker: Broker) -> None:
    name = uname("dies-sdk")
    got: list[str | None] = []
    async with publisher(broker, "ws", [provider(name)]) as pub, sdk(broker) as client:

        async def consume() -> None:
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)

        call = asyncio.create_task(consume())
        frame = await pub.next_frame("infer")
        await post_chunks(pub, broker, frame["taskId"], [{"data": chat_chunk("part")}], RESULT_W)
        await asyncio.sleep(0.3)
        await pub.disconnect()
        with pytest.raises(openai.APIError):
            await asyncio.wait_for(call, 10.0)
    assert got == ["part"]


async def test_error_posted_mid_stream(broker: Broker, transport: str) -> None:
    name = uname("errstream")
    message = f"upstream broke {uname('msg')}"
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        await post_chunks(pub, broker, frame["taskId"], [{"data": chat_chunk("a")}], 2)
        response_e = await pub.error(frame["taskId"], message, url=broker.url(0))
        assert response_e.status_code == 204
        _response, text = await asyncio.wait_for(call, 10.0)
        # The task is over: more chunks are refused.
        late = await pub.chunks(frame["taskId"], [{"data": chat_chunk("late")}])
        assert late.status_code == 404
    datas = [data for _, data in sse_events(text)]
    assert datas[0] == chat_chunk("a")
    assert "[DONE]" not in datas
    error = error_of(datas[-1])
    assert error is not None, text
    assert message in json.dumps(error), error


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, {"error": {"message": "too many", "type": "rate_limit", "code": "slow_down"}}),
        (400, {"error": {"message": "bad param", "type": "invalid_request_error", "code": None}}),
        (503, {"error": {"message": "model loading", "type": "server_error", "code": None}}),
    ],
)
async def test_refusal_before_streaming_reaches_the_client(
    broker: Broker, status: int, body: dict[str, Any]
) -> None:
    name = uname("refuse")
    async with publisher(broker, "sse", [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        assert frame["streaming"] is True
        assert (
            await pub.result(frame["taskId"], status, body, url=broker.url(2))
        ).status_code == 204
        response, text = await asyncio.wait_for(call, 10.0)
    assert response.status_code == status, text
    assert not response.headers["content-type"].startswith("text/event-stream")
    assert json.loads(text) == body


async def test_sdk_stream_refused_before_streaming(broker: Broker, transport: str) -> None:
    name = uname("refuse-sdk")
    async with publisher(broker, transport, [provider(name)]) as pub, sdk(broker) as client:

        async def consume() -> None:
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                pass

        call = asyncio.create_task(consume())
        frame = await pub.next_frame("infer")
        error = {"message": "quota", "type": "rate_limit", "code": "quota"}
        await pub.result(frame["taskId"], 429, {"error": error}, url=broker.url(RESULT_W))
        with pytest.raises(openai.RateLimitError) as failed:
            await asyncio.wait_for(call, 10.0)
    assert failed.value.status_code == 429
    assert failed.value.body == error


async def test_stream_task_is_finished_after_done(broker: Broker) -> None:
    name = uname("afterdone")
    async with publisher(broker, "sse", [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        await post_chunks(pub, broker, frame["taskId"], [{"data": chat_chunk("x")}, DONE], 2)
        _, text = await asyncio.wait_for(call, 10.0)
        assert [d for _, d in sse_events(text)] == [chat_chunk("x"), "[DONE]"]
        for worker in range(broker.n):
            url = broker.url(worker)
            assert (await pub.chunks(frame["taskId"], [{"data": "y"}], url=url)).status_code == 404
            assert (await pub.result(frame["taskId"], 200, {}, url=url)).status_code == 404
            assert (await pub.error(frame["taskId"], "late", url=url)).status_code == 404
        # The publisher still serves the next request.
        follow = asyncio.create_task(post_chat(broker, chat_body(name)))
        nxt: Frame = await pub.next_frame("infer")
        await pub.result(nxt["taskId"], 200, {"ok": True})
        assert (await asyncio.wait_for(follow, 10.0)).json() == {"ok": True}


async def test_evicted_mid_stream_ends_in_llm_evicted(broker: Broker, transport: str) -> None:
    name = uname("evict-stream")
    async with publisher(broker, transport, [provider(name)]) as pub:
        call = asyncio.create_task(stream_raw(broker, chat_body(name, stream=True)))
        frame = await pub.next_frame("infer")
        await post_chunks(pub, broker, frame["taskId"], [{"data": chat_chunk("so far")}], 2)
        await asyncio.sleep(0.3)
        async with http(broker.token("admin")) as admin:
            deleted = await admin.delete(f"{broker.url(1)}/api/v1/llms/{name}")
        assert deleted.status_code == 204
        response, text = await asyncio.wait_for(call, 10.0)
    assert response.status_code == 200
    datas = [data for _, data in sse_events(text)]
    assert datas[0] == chat_chunk("so far")
    assert "[DONE]" not in datas, text
    error = error_of(datas[-1])
    assert error is not None, text
    assert error.get("code") == "llm_evicted", error

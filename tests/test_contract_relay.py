"""Contract: the non-streaming relay of virtual LLMs — the client's request on worker 0, the
publisher's control stream on worker 1, its result POST on worker 2 (PROTOCOL.md "Task
results", "Client API")."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import openai
import pytest

from tests.cluster import Broker
from tests.contract_publisher import Frame, chat_answer
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    STREAM_W,
    chat_body,
    post_chat,
    provider,
    publisher,
    sdk,
    uname,
)

pytestmark = pytest.mark.multiproc


def assert_task_frame(
    frame: Frame, *, transport: str, name: str, endpoint: str, streaming: bool
) -> None:
    assert frame["_event"] == "task", frame
    assert frame["kind"] == "infer"
    assert isinstance(frame["taskId"], str)
    assert frame["taskId"]
    if transport == "sse":
        assert frame["_id"] == frame["taskId"]  # the SSE id is the task id
    assert frame["llmName"] == name
    assert frame["streaming"] is streaming
    assert frame["endpoint"] == endpoint
    assert isinstance(frame["body"], dict)


async def test_chat_through_three_workers_with_the_sdk(broker: Broker, transport: str) -> None:
    name = uname("relay")
    async with (
        publisher(broker, transport, [provider(name, model="Qwen/Qwen2.5-7B")]) as pub,
        sdk(broker, worker=CLIENT_W) as client,
    ):
        call = asyncio.create_task(
            client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": "héllo ✓"}],
                temperature=0.25,
                max_tokens=17,
            )
        )
        frame = await pub.next_frame("infer")
        assert_task_frame(
            frame,
            transport=transport,
            name=name,
            endpoint="/v1/chat/completions",
            streaming=False,
        )
        body = frame["body"]
        assert body["model"] == "Qwen/Qwen2.5-7B"  # the row's model, not the name
        assert body["messages"] == [{"role": "user", "content": "héllo ✓"}]
        assert body["temperature"] == 0.25
        assert body["max_tokens"] == 17
        assert not body.get("stream")
        response = await pub.result(
            frame["taskId"], 200, chat_answer("bonjour ✓"), url=broker.url(RESULT_W)
        )
        assert response.status_code == 204
        assert response.content == b""
        answer = await asyncio.wait_for(call, 10.0)
    assert answer.choices[0].message.content == "bonjour ✓"
    assert answer.usage is not None
    assert answer.usage.total_tokens == 2


RICH_BODY: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": 'Ünïcödé, emoji 🚀, quotes " and \\ backslash, \u2028'},
        {"role": "user", "content": [{"type": "text", "text": "part one"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        }
    ],
    "temperature": 0.1,
    "top_p": 1,
    "seed": 9007199254740993,
    "logit_bias": {"50256": -100},
    "stop": ["\n\n", "END"],
    "n": 1,
    "user": "user-42",
    "x_vendor_extension": {"nested": [1, 2.5, True, False, None, {"deep": "value"}]},
}


async def test_body_arrives_intact_and_answer_passes_through(
    broker: Broker, transport: str
) -> None:
    name = uname("intact")
    async with publisher(broker, transport, [provider(name, model="upstream-id")]) as pub:
        call = asyncio.create_task(post_chat(broker, {"model": name, **RICH_BODY}))
        frame = await pub.next_frame("infer")
        assert frame["body"] == {"model": "upstream-id", **RICH_BODY}
        answer = {
            **chat_answer("x"),
            "system_fingerprint": "fp_1",
            "x_extra": {"kept": ["as", "is"], "n": 1.5},
        }
        assert (
            await pub.result(frame["taskId"], 200, answer, url=broker.url(2))
        ).status_code == 204
        response = await asyncio.wait_for(call, 10.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == answer


STATUSES: list[tuple[int, Any]] = [
    (
        400,
        {
            "error": {
                "message": "max_tokens too large",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "context_length_exceeded",
            }
        },
    ),
    (401, {"error": {"message": "upstream key rejected", "type": "auth", "code": None}}),
    (
        404,
        {
            "error": {
                "message": "The model does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
        },
    ),
    (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}),
    (429, {"error": {"message": "slow down", "type": "rate_limit", "code": "rate_limited"}}),
    (500, {"error": {"message": "upstream crashed", "type": "server_error", "code": None}}),
    (503, {"error": {"message": "loading", "type": "server_error", "code": "busy"}}),
    (200, {"anything": ["not", "openai-shaped"], "n": 3}),
    (200, [1, "two", None]),
    (201, {"created": True}),
]


async def test_status_and_body_pass_through_as_they_are(broker: Broker, transport: str) -> None:
    name = uname("status")
    async with publisher(broker, transport, [provider(name)]) as pub:
        for status, body in STATUSES:
            call = asyncio.create_task(post_chat(broker, chat_body(name)))
            frame = await pub.next_frame("infer")
            posted = await pub.result(frame["taskId"], status, body, url=broker.url(RESULT_W))
            assert posted.status_code == 204
            response = await asyncio.wait_for(call, 10.0)
            assert response.status_code == status, (status, response.text)
            assert response.json() == body, (status, response.text)


async def test_upstream_400_stays_400_for_the_sdk(broker: Broker) -> None:
    name = uname("sdk400")
    error = {
        "message": "bad request upstream",
        "type": "invalid_request_error",
        "param": None,
        "code": "bad_thing",
    }
    async with publisher(broker, "sse", [provider(name)]) as pub, sdk(broker) as client:
        call = asyncio.create_task(
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        )
        frame = await pub.next_frame("infer")
        await pub.result(frame["taskId"], 400, {"error": error}, url=broker.url(RESULT_W))
        with pytest.raises(openai.BadRequestError) as failed:
            await asyncio.wait_for(call, 10.0)
    assert failed.value.status_code == 400
    assert failed.value.body == error
    assert failed.value.code == "bad_thing"


async def test_completions_and_embeddings(broker: Broker, transport: str) -> None:
    name = uname("endpoints")
    completion = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "four", "finish_reason": "stop", "logprobs": None}],
    }
    embedding = {
        "object": "list",
        "model": "m",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1.0]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    async with (
        publisher(broker, transport, [provider(name, model="emb-up")]) as pub,
        sdk(broker) as client,
    ):
        call = asyncio.create_task(
            client.completions.create(model=name, prompt="2+2=", max_tokens=3)
        )
        frame = await pub.next_frame("infer")
        assert_task_frame(
            frame, transport=transport, name=name, endpoint="/v1/completions", streaming=False
        )
        assert frame["body"]["prompt"] == "2+2="
        assert frame["body"]["model"] == "emb-up"
        await pub.result(frame["taskId"], 200, completion, url=broker.url(RESULT_W))
        done = await asyncio.wait_for(call, 10.0)
        assert done.choices[0].text == "four"

        call_e = asyncio.create_task(
            client.embeddings.create(model=name, input="hello", encoding_format="float")
        )
        frame = await pub.next_frame("infer")
        assert_task_frame(
            frame, transport=transport, name=name, endpoint="/v1/embeddings", streaming=False
        )
        assert frame["body"]["input"] == "hello"
        assert frame["body"]["model"] == "emb-up"
        await pub.result(frame["taskId"], 200, embedding, url=broker.url(RESULT_W))
        vectors = await asyncio.wait_for(call_e, 10.0)
        assert vectors.data[0].embedding == [0.5, -0.25, 1.0]


def embeddings_batch(inputs: int = 16, dims: int = 1536) -> dict[str, Any]:
    """What an embeddings model answers for a batch: about 500 KB of JSON, mostly floats."""
    rng = random.Random(7)
    return {
        "object": "list",
        "model": "m",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": [rng.uniform(-0.1, 0.1) for _ in range(dims)],
            }
            for i in range(inputs)
        ],
        "usage": {"prompt_tokens": inputs, "total_tokens": inputs},
        "x_note": "ünïcödé ✓ 🚀",
    }


async def test_a_big_answer_passes_through_exactly(broker: Broker, transport: str) -> None:
    """A batch of embeddings reaches the client value for value (every float bit for bit),
    posted to another worker, and over WebSocket sent on the socket too."""
    name = uname("big")
    answer = embeddings_batch()
    body = {"model": name, "input": [f"passage {i}" for i in range(16)]}
    async with publisher(broker, transport, [provider(name)]) as pub:
        ways = ["post", "socket"] if transport == "ws" else ["post"]
        for way in ways:
            call = asyncio.create_task(post_chat(broker, body, endpoint="/v1/embeddings"))
            frame = await pub.next_frame("infer")
            assert frame["endpoint"] == "/v1/embeddings"
            if way == "post":
                posted = await pub.result(frame["taskId"], 200, answer, url=broker.url(RESULT_W))
                assert posted.status_code == 204
            else:
                result = {"type": "result", "taskId": frame["taskId"], "status": 200}
                await pub.send_ws({**result, "body": answer})
            response = await asyncio.wait_for(call, 10.0)
            assert response.status_code == 200, response.text[:200]
            assert response.json() == answer


async def test_concurrent_requests_get_their_own_answers(broker: Broker, transport: str) -> None:
    name = uname("concurrent")
    async with publisher(broker, transport, [provider(name)]) as pub:

        async def handler(frame: Frame) -> None:
            if frame.get("kind") != "infer":
                return
            text = frame["body"]["messages"][0]["content"]
            await asyncio.sleep(0.05 * (hash(text) % 5))  # answer out of order
            worker = int(text.split("-")[1]) % 3
            await pub.result(
                frame["taskId"], 200, chat_answer(f"echo {text}"), url=broker.url(worker)
            )

        pub.serve(handler)
        calls = [post_chat(broker, chat_body(name, f"req-{i}"), worker=i % 3) for i in range(9)]
        responses = await asyncio.wait_for(asyncio.gather(*calls), 30.0)
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == f"echo req-{i}"


async def test_one_session_serves_several_llms(broker: Broker, transport: str) -> None:
    a, b = uname("multi-a"), uname("multi-b")
    async with publisher(
        broker, transport, [provider(a, model="model-a"), provider(b, model="model-b")]
    ) as pub:
        for name, model in ((a, "model-a"), (b, "model-b")):
            call = asyncio.create_task(post_chat(broker, chat_body(name)))
            frame = await pub.next_frame("infer")
            assert frame["llmName"] == name
            assert frame["body"]["model"] == model
            await pub.result(frame["taskId"], 200, chat_answer(model), url=broker.url(STREAM_W))
            response = await asyncio.wait_for(call, 10.0)
            assert response.json()["choices"][0]["message"]["content"] == model

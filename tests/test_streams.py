"""Streamed inference in process (Django's async test client against the real views, hub and
channel layer): the SSE body a client sees for each thing a publisher may do."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings

from tests.conftest import Tokens
from virtual_llms import answers, binding
from virtual_llms import hub as hub_mod
from virtual_llms.inference import as_stream_chunk
from virtual_llms.models import Llm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def stream(tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub) -> hub_mod.ControlStream:
    """The publisher's control stream for session "sess", serving LLM "m1" (model "up")."""
    control = hub_mod.ControlStream("sess", tokens.publisher.pk)
    await binding.stream_open(control)
    return control


async def call(tokens: Tokens, body: dict[str, Any]) -> Any:
    client = AsyncClient()
    return await client.post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {tokens.client_plain}"},
    )


async def body_of(response: Any) -> str:
    parts = [chunk async for chunk in response.streaming_content]
    return b"".join(parts).decode()


async def task_frame(control: hub_mod.ControlStream) -> dict[str, Any]:
    frame = await asyncio.wait_for(control.queue.get(), 5)
    assert frame is not None
    return dict(frame)


REQUEST = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_chunks_are_relayed_in_order_and_end_with_done(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    assert frame["streaming"] is True
    assert frame["body"]["model"] == "up"
    pub = tokens.publisher.pk
    assert await answers.post_chunks(
        token_id=pub, task_id=frame["taskId"], chunks=[{"data": "a", "done": False}]
    )
    assert await answers.post_chunks(
        token_id=pub,
        task_id=frame["taskId"],
        chunks=[{"data": "b", "done": False}, {"data": "[DONE]", "done": True}],
    )
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["X-Accel-Buffering"] == "no"
    assert "mcpd;dur=" in response["Server-Timing"]
    assert await body_of(response) == "data: a\n\ndata: b\n\ndata: [DONE]\n\n"


async def test_a_done_chunk_without_done_data_still_ends_with_done(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    await answers.post_chunks(
        token_id=tokens.publisher.pk,
        task_id=frame["taskId"],
        chunks=[{"data": "x\ny", "done": True}],
    )
    response = await asyncio.wait_for(request, 10)
    # A payload with a newline is one event of two data lines.
    assert await body_of(response) == "data: x\ndata: y\n\ndata: [DONE]\n\n"


async def test_a_refusal_before_streaming_reaches_the_client_as_it_is(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    refusal = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=400, body=refusal
    )
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 400
    assert json.loads(response.content) == refusal


async def test_a_whole_answer_to_a_streaming_call_becomes_one_chunk(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
    }
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer
    )
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200
    events = [e for e in (await body_of(response)).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunk = json.loads(events[0].removeprefix("data: "))
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "hello"}


async def test_an_error_mid_stream_ends_with_an_error_event_and_no_done(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    pub = tokens.publisher.pk
    await answers.post_chunks(
        token_id=pub, task_id=frame["taskId"], chunks=[{"data": "partial", "done": False}]
    )
    response = await asyncio.wait_for(request, 10)
    body = asyncio.create_task(body_of(response))
    await asyncio.sleep(0.1)
    await answers.post_error(token_id=pub, task_id=frame["taskId"], message="GPU fell over")
    text = await asyncio.wait_for(body, 10)
    assert text.startswith("data: partial\n\n")
    assert "[DONE]" not in text
    error = json.loads(text.split("\n\n")[1].removeprefix("data: "))["error"]
    assert error["code"] == "publisher_error"
    assert "GPU fell over" in error["message"]


async def test_a_quiet_publisher_gets_pings_then_a_timeout_event_and_a_cancel(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    with override_settings(MCPD_PING_SECONDS=0.2, MCPD_INFER_TIMEOUT_SECONDS=1.0):
        request = asyncio.create_task(call(tokens, REQUEST))
        frame = await task_frame(stream)
        response = await asyncio.wait_for(request, 10)
        text = await asyncio.wait_for(body_of(response), 10)
    assert text.startswith(": ping\n\n")
    assert "[DONE]" not in text
    assert (
        json.loads(text.rstrip().rsplit("\n\n", 1)[-1].removeprefix("data: "))["error"]["code"]
        == "timeout"
    )
    cancel = await task_frame(stream)
    assert cancel == {"kind": "cancel", "taskId": frame["taskId"]}
    assert not await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body={}
    )


async def test_a_client_that_leaves_mid_stream_cancels_the_task(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    pub = tokens.publisher.pk
    await answers.post_chunks(
        token_id=pub, task_id=frame["taskId"], chunks=[{"data": "one", "done": False}]
    )
    response = await asyncio.wait_for(request, 10)
    first: asyncio.Queue[bytes] = asyncio.Queue()

    async def read() -> None:
        async for chunk in response.streaming_content:
            first.put_nowait(chunk)

    reader = asyncio.create_task(read())
    assert await asyncio.wait_for(first.get(), 5) == b"data: one\n\n"
    reader.cancel()  # what Django does when the client disconnects
    cancel = await task_frame(stream)
    assert cancel == {"kind": "cancel", "taskId": frame["taskId"]}
    assert not await answers.post_chunks(
        token_id=pub, task_id=frame["taskId"], chunks=[{"data": "late", "done": False}]
    )


def test_as_stream_chunk_leaves_other_bodies_alone() -> None:
    text = {"object": "text_completion", "choices": [{"text": "x", "index": 0}]}
    assert as_stream_chunk(text) == text
    assert as_stream_chunk([1, 2]) == [1, 2]


async def hibernate() -> None:
    await sync_to_async(Llm.objects.filter(name="m1").update)(status="hibernating")


async def test_a_streamed_call_to_a_sleeping_llm_whose_wake_fails_soon_gets_502(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    await hibernate()
    request = asyncio.create_task(call(tokens, REQUEST))
    wake = await task_frame(stream)
    assert wake["kind"] == "wake"
    await answers.post_error(token_id=tokens.publisher.pk, task_id=wake["taskId"], message="no GPU")
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 502
    assert "no GPU" in json.loads(response.content)["error"]["message"]


async def test_a_streamed_call_to_a_slow_waking_llm_gets_headers_and_comments_first(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    await hibernate()
    with override_settings(MCPD_PING_SECONDS=0.2):
        request = asyncio.create_task(call(tokens, REQUEST))
        wake = await task_frame(stream)
        response = await asyncio.wait_for(request, 10)  # headers before the wake ends
        assert response.status_code == 200
        body = asyncio.create_task(body_of(response))
        await asyncio.sleep(0.5)
        pub = tokens.publisher.pk
        await answers.post_result(token_id=pub, task_id=wake["taskId"], status=200, body={})
        infer = await task_frame(stream)
        assert infer["kind"] == "infer"
        await answers.post_chunks(
            token_id=pub, task_id=infer["taskId"], chunks=[{"data": "[DONE]", "done": True}]
        )
        text = await asyncio.wait_for(body, 10)
    assert text.startswith(": waking m1\n\n: ping\n\n")
    assert ": mcpd woke m1 in " in text
    assert text.endswith("data: [DONE]\n\n")


async def test_a_streamed_call_to_a_sleeping_llm_without_a_stream_is_503_at_once(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    await hibernate()
    await binding.stream_close(stream)
    await hibernate()  # closing the stream made the row inactive; put it back to sleep
    response = await asyncio.wait_for(call(tokens, REQUEST), 5)
    assert response.status_code == 503
    assert response["Retry-After"]
    assert json.loads(response.content)["error"]["code"] == "publisher_offline"

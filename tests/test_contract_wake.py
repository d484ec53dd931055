"""Contract: hibernating LLMs — one wake task per LLM across all workers however many requests
wait, no infer task before the wake's result, a failed wake reaching every waiter, and
inactive rows that never wake (PROTOCOL.md "Client API" table, "Task results")."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, Frame, chat_answer, chat_chunk
from tests.contract_support import (
    RESULT_W,
    Json,
    assert_offline,
    assert_openai_error,
    chat_body,
    get_row,
    post_chat,
    provider,
    publisher,
    sse_events,
    uname,
    wait_wake_waiting,
)

pytestmark = pytest.mark.multiproc


def kinds(pub: ContractPublisher, kind: str) -> list[Frame]:
    return [frame for frame in pub.seen if frame.get("kind") == kind]


async def answer_wake(
    pub: ContractPublisher, broker: Broker, wake: Frame, status: int = 200
) -> None:
    """Say the model is awake (or not): over the socket on WebSocket, else by POST."""
    if pub.transport == "ws":
        await pub.send_ws(
            {"type": "result", "taskId": wake["taskId"], "status": status, "body": {}}
        )
    else:
        posted = await pub.result(wake["taskId"], status, {}, url=broker.url(RESULT_W))
        assert posted.status_code == 204, posted.text


async def test_one_wake_for_many_concurrent_requests(broker: Broker, transport: str) -> None:
    name = uname("sleepy")
    async with publisher(broker, transport, [provider(name, status="hibernating")]) as pub:
        calls = [
            asyncio.create_task(post_chat(broker, chat_body(name, f"q{i}"), worker=i % 3))
            for i in range(6)
        ]
        wake = await pub.next_frame(timeout=10.0)
        assert wake["kind"] == "wake", f"the first frame must be the wake task: {wake}"
        assert set(wake) - {"_event", "_id"} == {"kind", "taskId", "llmName"}
        assert wake["llmName"] == name
        await wait_wake_waiting(broker, len(calls))  # every request is waiting now
        assert not any(c.done() for c in calls)
        assert len(kinds(pub, "wake")) == 1, pub.seen
        assert kinds(pub, "infer") == [], "no infer task before the wake's result"
        await answer_wake(pub, broker, wake)

        infers = [await pub.next_frame("infer", timeout=10.0) for _ in calls]
        for frame in infers:
            text = frame["body"]["messages"][0]["content"]
            await pub.result(frame["taskId"], 200, chat_answer(f"a-{text}"), url=broker.url(2))
        responses = await asyncio.wait_for(asyncio.gather(*calls), 15.0)
        for i, response in enumerate(responses):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == f"a-q{i}"
        assert len(kinds(pub, "wake")) == 1
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "active"
        # Awake now: the next request goes straight to an infer task.
        call = asyncio.create_task(post_chat(broker, chat_body(name)))
        frame = await pub.next_frame(timeout=10.0)
        assert frame["kind"] == "infer"
        await pub.result(frame["taskId"], 200, chat_answer("awake"))
        assert (await asyncio.wait_for(call, 10.0)).status_code == 200


async def test_failed_wake_fails_every_waiter_and_stays_hibernating(
    broker: Broker, transport: str
) -> None:
    name = uname("nowake")
    message = f"not enough VRAM ({uname('m')})"
    async with publisher(broker, transport, [provider(name, status="hibernating")]) as pub:
        calls = [
            asyncio.create_task(post_chat(broker, chat_body(name), worker=i % 3)) for i in range(4)
        ]
        wake = await pub.next_frame("wake")
        await wait_wake_waiting(broker, len(calls))
        if transport == "ws":
            await pub.send_ws({"type": "error", "taskId": wake["taskId"], "error": message})
        else:
            assert (await pub.error(wake["taskId"], message, url=broker.url(0))).status_code == 204
        responses = await asyncio.wait_for(asyncio.gather(*calls), 10.0)
        for response in responses:
            err = assert_openai_error(response, 502)
            assert message in err["message"], err
        assert kinds(pub, "infer") == []
        assert len(kinds(pub, "wake")) == 1
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "hibernating"
        # The next request wakes again, and this time it works.
        call = asyncio.create_task(post_chat(broker, chat_body(name, "again"), worker=1))
        second = await pub.next_frame("wake")
        assert second["taskId"] != wake["taskId"]
        await answer_wake(pub, broker, second)
        frame = await pub.next_frame("infer")
        await pub.result(frame["taskId"], 200, chat_answer("finally"), url=broker.url(2))
        response = await asyncio.wait_for(call, 10.0)
        assert response.status_code == 200
        assert response.json() == chat_answer("finally")


async def test_wake_result_with_error_status_fails_the_wake(broker: Broker) -> None:
    name = uname("wake500")
    async with publisher(broker, "sse", [provider(name, status="hibernating")]) as pub:
        calls = [asyncio.create_task(post_chat(broker, chat_body(name), worker=w)) for w in (0, 2)]
        wake = await pub.next_frame("wake")
        await wait_wake_waiting(broker, len(calls))
        posted = await pub.result(
            wake["taskId"], 500, {"error": "weights missing"}, url=broker.url(1)
        )
        assert posted.status_code == 204
        for response in await asyncio.wait_for(asyncio.gather(*calls), 10.0):
            assert_openai_error(response, 502)
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "hibernating"
        assert kinds(pub, "infer") == []


async def test_inactive_rows_never_wake(broker: Broker, transport: str) -> None:
    name, keep = uname("deadsleep"), uname("keep")
    providers = [provider(name, status="hibernating"), provider(keep)]
    async with publisher(broker, transport, providers) as pub:
        assert (await pub.register([provider(keep)])).status_code == 200  # name is inactive
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "inactive"
        for worker in range(3):
            start = time.monotonic()
            response = await post_chat(broker, chat_body(name), worker=worker, timeout=15.0)
            assert_offline(response)
            assert time.monotonic() - start < 2.5
        await asyncio.sleep(0.5)
        assert kinds(pub, "wake") == []
        assert kinds(pub, "infer") == []


async def test_hibernating_without_a_stream_is_503_at_once(broker: Broker) -> None:
    name = uname("nostream")
    async with publisher(broker, "sse", [provider(name, status="hibernating")], connect=False):
        for body in (chat_body(name), chat_body(name, stream=True)):
            start = time.monotonic()
            response = await post_chat(broker, body, timeout=15.0)
            assert_offline(response)
            assert time.monotonic() - start < 2.5


async def test_status_hibernating_then_streamed_request_wakes_first(
    broker: Broker, transport: str
) -> None:
    name = uname("napper")
    async with publisher(broker, transport, [provider(name)]) as pub:
        response = await pub.set_status(name, "hibernating")
        assert response.status_code == 200
        assert response.json()["status"] == "hibernating"
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {broker.token('client')}"}, timeout=30.0
        ) as client:

            async def stream() -> tuple[int, str]:
                async with client.stream(
                    "POST",
                    f"{broker.url(0)}/v1/chat/completions",
                    json=chat_body(name, stream=True),
                ) as streamed:
                    return streamed.status_code, (await streamed.aread()).decode()

            call = asyncio.create_task(stream())
            wake = await pub.next_frame()
            assert wake["kind"] == "wake"
            await wait_wake_waiting(broker, 1)
            assert kinds(pub, "infer") == []
            await answer_wake(pub, broker, wake)
            frame = await pub.next_frame("infer")
            assert frame["streaming"] is True
            chunks: list[Json] = [{"data": chat_chunk("up")}, {"data": "[DONE]", "done": True}]
            assert (await pub.chunks(frame["taskId"], chunks, url=broker.url(2))).status_code == 204
            status, text = await asyncio.wait_for(call, 10.0)
        assert status == 200
        assert [d for _, d in sse_events(text)] == [chat_chunk("up"), "[DONE]"]
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "active"


async def test_failed_wake_reaches_a_streamed_request_as_502(broker: Broker) -> None:
    """A streamed request waiting on a wake is a waiting request too: the wake fails within a
    second, long before any keep-alive comment is due, so the 502 is a status line."""
    name = uname("nowake-stream")
    message = f"wake refused ({uname('m')})"
    async with publisher(broker, "sse", [provider(name, status="hibernating")]) as pub:
        call = asyncio.create_task(post_chat(broker, chat_body(name, stream=True)))
        wake = await pub.next_frame("wake")
        assert (await pub.error(wake["taskId"], message, url=broker.url(2))).status_code == 204
        response = await asyncio.wait_for(call, 10.0)
        err = assert_openai_error(response, 502)
        assert message in err["message"], err
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "hibernating"

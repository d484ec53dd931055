"""Bursts of big bodies on three daphne workers with PostgreSQL + Redis (issue 29 item 1):
tasks and answers of megabytes must not ride Redis pub/sub, whose per-subscriber output
limit (32 MB by default) cuts a worker's subscription off, losing every message to it. Eight
9 MB requests at once, each answered with 4 MB, all reach their clients, and another
publisher's calls on the same stream worker go on meanwhile; nothing is left in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from tests.cluster import REDIS_URL, Broker
from tests.conftest import require_services
from tests.contract_publisher import Frame, chat_answer
from tests.contract_support import (
    RESULT_W,
    chat_body,
    post_chat,
    prime,
    provider,
    publisher,
    uname,
)

pytestmark = pytest.mark.multiproc

REQUEST_BYTES = 9 * 1024 * 1024
ANSWER_BYTES = 4 * 1024 * 1024
BURST = 8


@pytest.fixture(scope="module")
def big() -> Iterator[Broker]:
    require_services()
    broker = Broker(3, services=True, env={"MCPD_INFER_TIMEOUT_SECONDS": "30"}).start()
    yield broker
    broker.stop()


def answer_to(frame: Frame) -> str:
    """What the publisher answers a task: a big text that says which request it was for."""
    text = frame["body"]["messages"][0]["content"]
    return text[:12] + "x" * ANSWER_BYTES


async def test_a_burst_of_big_requests_and_answers_loses_nothing(big: Broker) -> None:
    prime(big)
    name, other = uname("big"), uname("small")
    async with (
        publisher(big, "sse", [provider(name)]) as pub,
        publisher(big, "sse", [provider(other)]) as bystander,
    ):

        async def answer(frame: Frame) -> None:
            if frame["kind"] != "infer":
                return  # a cancel: a call that timed out
            posted = await pub.result(
                frame["taskId"], 200, chat_answer(answer_to(frame)), url=big.url(RESULT_W)
            )
            assert posted.status_code == 204, posted.text

        async def answer_small(frame: Frame) -> None:
            if frame["kind"] != "infer":
                return
            text = frame["body"]["messages"][0]["content"]
            posted = await bystander.result(frame["taskId"], 200, chat_answer(f"re {text}"))
            assert posted.status_code == 204, posted.text

        pub.serve(answer)
        bystander.serve(answer_small)
        prompts = [f"{i:04d}-request-" + "y" * REQUEST_BYTES for i in range(BURST)]
        calls = [
            asyncio.create_task(post_chat(big, chat_body(name, p), worker=0, timeout=60.0))
            for p in prompts
        ]
        small = [
            asyncio.create_task(post_chat(big, chat_body(other, f"s{i}"), worker=i % 3))
            for i in range(20)
        ]
        responses = await asyncio.wait_for(asyncio.gather(*calls), 90.0)
        small_responses = await asyncio.wait_for(asyncio.gather(*small), 30.0)
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * BURST, (statuses, [r.text[:200] for r in responses])
    for prompt, response in zip(prompts, responses, strict=True):
        content = response.json()["choices"][0]["message"]["content"]
        assert content[:12] == prompt[:12]
        assert len(content) == 12 + ANSWER_BYTES
    assert [r.status_code for r in small_responses] == [200] * 20, [
        r.text[:200] for r in small_responses
    ]
    assert [r.json()["choices"][0]["message"]["content"] for r in small_responses] == [
        f"re s{i}" for i in range(20)
    ]
    # No worker lost its subscription: none logged the layer's connection closed.
    for i in range(3):
        assert "Connection closed by server" not in big.log(i, tail=None), big.log(i)
    # What rode Redis keys instead is gone once taken.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        left = list(client.scan_iter(match=f"{big.env['MCPD_REDIS_PREFIX']}:spill:*"))
    finally:
        client.close()
    assert left == []


async def test_a_burst_of_many_big_tasks_reaches_a_publisher_that_reads_them(big: Broker) -> None:
    """200 tasks of 900 KB at once (180 MB behind the publisher's stream for a while): each
    reaches it over its one stream and is answered; a publisher reading slower than its
    tasks arrive is busy, not gone (16 answered before spill.py; at a 64 MiB stream bound,
    the publisher was cut)."""
    prime(big)
    name = uname("many")
    async with publisher(big, "sse", [provider(name)]) as pub:

        async def answer(frame: Frame) -> None:
            if frame["kind"] == "infer":
                text = frame["body"]["messages"][0]["content"][:8]
                await pub.result(frame["taskId"], 200, chat_answer(text), url=big.url(RESULT_W))

        pub.serve(answer)
        prompts = [f"{i:07d}-" + "z" * 900_000 for i in range(200)]
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(post_chat(big, chat_body(name, p), worker=0, timeout=60.0) for p in prompts)
            ),
            90.0,
        )
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 200, [r.text[:200] for r in responses if r.status_code != 200][:3]
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert answers == [p[:8] for p in prompts]

"""Wake-before-infer across three daphne processes on PostgreSQL + Redis, driven by the
`openai` SDK and a publisher written from the contract (issue: hibernation)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, Frame, chat_answer

pytestmark = pytest.mark.multiproc

N = 50


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_services()
    b = Broker(
        3,
        services=True,
        env={"MCPD_WAKE_TIMEOUT_SECONDS": "4", "MCPD_INFER_TIMEOUT_SECONDS": "20"},
    ).start()
    yield b
    b.stop()


@pytest.fixture
async def sleeping(broker: Broker) -> AsyncIterator[tuple[ContractPublisher, str]]:
    """A hibernating LLM whose publisher holds its stream on worker 1."""
    name = f"sleepy-{uuid.uuid4().hex[:8]}"
    pub = ContractPublisher(broker.url(1), broker.token("publisher"))
    response = await pub.register(
        [{"name": name, "type": "openai", "model": "m", "status": "hibernating"}]
    )
    assert response.status_code == 200, response.text
    await pub.connect()
    yield pub, name
    await pub.aclose()


def client(broker: Broker, worker: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{broker.url(worker)}/v1",
        api_key=broker.token("client"),
        max_retries=0,
        timeout=60.0,
    )


async def ask(broker: Broker, worker: int, name: str) -> Any:
    async with client(broker, worker) as c:
        return await c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"from worker {worker}"}]
        )


def status_of(broker: Broker, name: str) -> str:
    return str(broker.sql("SELECT status FROM virtual_llms_llm WHERE name = %s", name)[0][0])


async def test_many_concurrent_requests_over_three_workers_share_one_wake(
    broker: Broker, sleeping: tuple[ContractPublisher, str]
) -> None:
    pub, name = sleeping
    requests = [asyncio.create_task(ask(broker, i % 3, name)) for i in range(N)]
    wake = await pub.next_frame(timeout=20)
    assert wake["kind"] == "wake"
    assert wake["llmName"] == name
    # Nobody else wakes it, and no infer task comes before the wake is confirmed.
    await asyncio.sleep(1.5)
    assert [f["kind"] for f in pub.seen] == ["wake"]
    assert (
        await pub.result(wake["taskId"], 200, {"ok": True}, url=broker.url(2))
    ).status_code == 204

    async def answer(frame: Frame) -> None:
        assert frame["kind"] == "infer"
        await pub.result(frame["taskId"], 200, chat_answer(frame["body"]["messages"][0]["content"]))

    pub.serve(answer)
    answers = await asyncio.wait_for(asyncio.gather(*requests), 60)
    kinds = [f["kind"] for f in pub.seen]
    assert kinds.count("wake") == 1
    assert kinds.count("infer") == N
    assert kinds[0] == "wake"
    assert sorted(a.choices[0].message.content for a in answers) == sorted(
        f"from worker {i % 3}" for i in range(N)
    )
    assert status_of(broker, name) == "active"


async def test_a_failed_wake_reaches_every_waiter_and_the_row_stays_hibernating(
    broker: Broker, sleeping: tuple[ContractPublisher, str]
) -> None:
    pub, name = sleeping
    requests = [asyncio.create_task(ask(broker, i % 3, name)) for i in range(N)]
    wake = await pub.next_frame(timeout=20)
    await asyncio.sleep(1.0)  # let every request reach its worker and wait
    response = await pub.error(wake["taskId"], "GPU out of memory while loading", url=broker.url(0))
    assert response.status_code == 204
    results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 60)
    for result in results:
        assert isinstance(result, openai.APIStatusError), result
        assert result.status_code == 502
        assert "GPU out of memory while loading" in str(result.message)
    assert [f["kind"] for f in pub.seen] == ["wake"]
    assert status_of(broker, name) == "hibernating"
    # The next request wakes again.
    retry = asyncio.create_task(ask(broker, 2, name))
    assert (await pub.next_frame(timeout=20))["kind"] == "wake"
    retry.cancel()


async def test_a_wake_timeout_gives_504_and_a_cancel(
    broker: Broker, sleeping: tuple[ContractPublisher, str]
) -> None:
    pub, name = sleeping
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        await asyncio.wait_for(ask(broker, 0, name), 30)
    assert exc.value.status_code == 504
    assert time.monotonic() - started < 15
    wake = pub.seen[0]
    assert wake["kind"] == "wake"
    cancel = await pub.next_frame("cancel", timeout=10)
    assert cancel["taskId"] == wake["taskId"]
    # The late answer is refused.
    assert (await pub.result(wake["taskId"], 200, {})).status_code == 404


async def test_a_killed_lease_holder_delays_the_wake_by_at_most_the_lease(
    broker: Broker, sleeping: tuple[ContractPublisher, str]
) -> None:
    """Worker 0 takes the wake lease and is killed with SIGKILL before the wake is answered.
    A request on worker 2 waits out the lease (5 s), then wakes again: one wake at a time."""
    pub, name = sleeping
    doomed = asyncio.create_task(ask(broker, 0, name))
    first = await pub.next_frame(timeout=20)
    assert first["kind"] == "wake"
    survivor = asyncio.create_task(ask(broker, 2, name))
    await asyncio.sleep(0.5)
    broker.kill(0)
    killed_at = time.monotonic()
    try:
        second = await pub.next_frame(timeout=20)
        delay = time.monotonic() - killed_at
        assert second["kind"] == "wake"
        assert second["taskId"] != first["taskId"]
        assert delay <= 5.0 + 2.0  # the lease, plus a refresh period and scheduling slack
        await pub.result(second["taskId"], 200, {"ok": True}, url=broker.url(1))
        infer = await pub.next_frame(timeout=20)
        assert infer["kind"] == "infer"
        await pub.result(infer["taskId"], 200, chat_answer("survived"), url=broker.url(1))
        answer = await asyncio.wait_for(survivor, 20)
        assert answer.choices[0].message.content == "survived"
        assert [f["kind"] for f in pub.seen].count("wake") == 2
        with pytest.raises(openai.APIConnectionError):
            await doomed
    finally:
        broker.start_worker(0)

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


# Issue 26: a wake answered at once must reach every waiter on every worker. The outcome of
# each wake is readable after the fact (keyed by its lease's epoch, and by when it was
# decided), so a waiter that joins or subscribes after the outcome was announced still
# learns it instead of timing out. Half the rounds fail, half succeed.
ROUNDS = 36
MESSAGE = "wake recipe failed"


async def ask_on(c: openai.AsyncOpenAI, name: str) -> Any:
    return await c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])


async def test_wakes_answered_at_once_reach_every_waiter(broker: Broker) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    pub = ContractPublisher(broker.url(0), broker.token("publisher"))
    reg = await pub.register(
        [{"name": name, "type": "openai", "model": "m", "status": "hibernating"}]
    )
    assert reg.status_code == 200, reg.text
    await pub.connect()
    failing = True
    wakes: list[str] = []

    async def answer(frame: Frame) -> None:
        if frame["kind"] == "wake":
            wakes.append(frame["taskId"])
            if failing:
                await pub.error(frame["taskId"], MESSAGE, url=broker.url(len(wakes) % 3))
            else:
                await pub.result(frame["taskId"], 200, {"ok": True}, url=broker.url(1))
        elif frame["kind"] == "infer":
            await pub.result(frame["taskId"], 200, chat_answer("woke"))

    pub.serve(answer)
    clients = [client(broker, w) for w in range(3)]
    extra_wakes = 0
    try:
        for round_no in range(ROUNDS):
            failing = round_no % 2 == 0
            waiters = 6 + round_no % 15  # 6..20
            response = await pub.set_status(name, "hibernating")
            assert response.status_code == 200, response.text
            before = len(wakes)
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(ask_on(clients[i % 3], name) for i in range(waiters)), return_exceptions=True
                ),
                30,
            )
            for result in results:
                if failing:
                    assert isinstance(result, openai.APIStatusError), (round_no, result)
                    assert result.status_code == 502, (round_no, result.status_code)
                    assert MESSAGE in str(result.message)
                else:
                    assert not isinstance(result, BaseException), (round_no, result)
                    assert result.choices[0].message.content == "woke"
            count = len(wakes) - before
            if failing:
                # The contract: a failed wake leaves the row hibernating and "the next request
                # wakes again". A request that reached its worker before the wake failed gets
                # that failure even if it had not joined the wake yet, and never wakes again;
                # one that reached it only after (a client slowed by a loaded machine) may
                # start a second wake, which is answered too (no waiter is left without an
                # answer: asserted above). Before issue 26 that was 15 of 18 failing rounds.
                assert count >= 1
                extra_wakes += count - 1
            else:
                assert count == 1, (round_no, count)
    finally:
        for c in clients:
            await c.close()
        await pub.aclose()
    assert extra_wakes <= ROUNDS // 8, extra_wakes

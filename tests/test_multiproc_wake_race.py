"""A wake answered at once must reach every waiter on every worker (issue 26): the outcome
of each wake is readable after the fact, keyed by its lease's epoch, so a waiter that
subscribes after the outcome was announced still learns it instead of timing out.

Three daphne processes on PostgreSQL + Redis, the `openai` SDK, a publisher written from
the contract that answers each wake the moment it gets it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, Frame, chat_answer

pytestmark = pytest.mark.multiproc

ROUNDS = 36  # half failing, half succeeding
MESSAGE = "wake recipe failed"


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


async def ask(c: openai.AsyncOpenAI, name: str) -> Any:
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
    clients = [
        openai.AsyncOpenAI(
            base_url=f"{broker.url(w)}/v1",
            api_key=broker.token("client"),
            max_retries=0,
            timeout=30.0,
        )
        for w in range(3)
    ]
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
                    *(ask(clients[i % 3], name) for i in range(waiters)), return_exceptions=True
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

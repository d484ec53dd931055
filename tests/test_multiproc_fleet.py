"""Fleets across three daphne processes on PostgreSQL + Redis (PROTOCOL.md v1.1 "Pools"):
least-busy spread, no over-admission, the shared queue's limits, failover before the first
byte, draining, and one wake for a sleeping pool. Clients are the `openai` SDK; publishers
are written from the contract (tests/contract_publisher.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, Frame, chat_answer, chat_chunk
from tests.test_multiproc_restarts import Load, summary, wait_serving
from tests.test_publisher_e2e import start_agent
from tests.test_publisher_upstream import FakeUpstream

pytestmark = pytest.mark.multiproc

QUEUE_TIMEOUT = 2.0
QUEUE_MAX = 3


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_services()
    b = Broker(
        3,
        services=True,
        env={
            "MCPD_QUEUE_TIMEOUT_SECONDS": str(QUEUE_TIMEOUT),
            "MCPD_QUEUE_MAX": str(QUEUE_MAX),
            "MCPD_INFER_TIMEOUT_SECONDS": "20",
            "MCPD_WAKE_TIMEOUT_SECONDS": "5",
        },
    ).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def owner_tokens(broker: Broker) -> list[str]:
    """Three publisher tokens of one owner (one per box)."""
    return broker.owner_tokens(3)


class Box:
    """One backend: a contract publisher that holds each task until released, counting how
    many it runs at once."""

    def __init__(self, pub: ContractPublisher, name: str) -> None:
        self.pub = pub
        self.name = name
        self.running = 0
        self.most = 0
        self.tasks: list[Frame] = []
        self.release = asyncio.Event()
        self.answer = True

    async def handle(self, frame: Frame) -> None:
        if frame.get("kind") == "wake":
            self.tasks.append(frame)
            await asyncio.sleep(0.3)
            await self.pub.result(frame["taskId"], 200, {})
            return
        if frame.get("kind") != "infer":
            return
        self.tasks.append(frame)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            # Done once its answer is on its way: the broker frees the slot as the answer
            # arrives, and the next task may reach this box before the POST's 204 does.
            self.running -= 1
        if self.answer:
            await self.pub.result(frame["taskId"], 200, chat_answer(self.pub.session_id or ""))

    def infers(self) -> int:
        return sum(1 for f in self.tasks if f.get("kind") == "infer")


@asynccontextmanager
async def pool(
    broker: Broker,
    tokens: list[str],
    slots: list[int | None],
    *,
    status: str = "active",
    release: bool = False,
) -> AsyncIterator[tuple[str, list[Box]]]:
    """A pooled name served by one box per entry of ``slots`` (its maxConcurrency), each
    box's stream on a different worker."""
    name = f"pool-{uuid.uuid4().hex[:8]}"
    boxes: list[Box] = []
    try:
        for i, n in enumerate(slots):
            pub = ContractPublisher(broker.url(i), tokens[i])
            provider: dict[str, Any] = {"name": name, "type": "openai", "model": "m"}
            provider |= {"pool": True, "status": status}
            if n is not None:
                provider["maxConcurrency"] = n
            response = await pub.register([provider])
            assert response.status_code == 200, response.text
            await pub.connect()
            box = Box(pub, name)
            if release:
                box.release.set()
            pub.serve(box.handle)
            boxes.append(box)
        yield name, boxes
    finally:
        for box in boxes:
            box.release.set()
        for box in boxes:
            await box.pub.aclose()


def sdk(broker: Broker, worker: int, timeout: float = 30.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{broker.url(worker)}/v1",
        api_key=broker.token("client"),
        max_retries=0,
        timeout=timeout,
    )


async def ask(broker: Broker, worker: int, name: str, text: str = "hi") -> str:
    async with sdk(broker, worker) as client:
        answer = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": text}]
        )
    return answer.choices[0].message.content or ""


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_requests_go_to_the_least_busy_backend(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [2, 2]) as (name, boxes):
        calls = [asyncio.create_task(ask(broker, i % 3, name)) for i in range(4)]
        await until(lambda: sum(b.running for b in boxes) == 4)
        assert [b.running for b in boxes] == [2, 2]
        for box in boxes:
            box.release.set()
        answers = await asyncio.gather(*calls)
    assert sorted(answers) == sorted(str(b.pub.session_id) for b in boxes for _ in range(2))


async def test_no_backend_runs_more_than_its_slots_under_load(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [4, 4, 4]) as (name, boxes):

        async def one(i: int) -> str:
            return await ask(broker, i % 3, name)

        async def drip() -> None:  # let tasks finish a few at a time while more arrive
            while True:
                await asyncio.sleep(0.05)
                for box in boxes:
                    box.release.set()
                await asyncio.sleep(0)
                for box in boxes:
                    box.release.clear()

        # 36 at once: 12 run, up to QUEUE_MAX wait per name... so send in waves of 15.
        dripper = asyncio.create_task(drip())
        try:
            answers: list[str] = []
            for _ in range(4):
                answers += await asyncio.gather(*(one(i) for i in range(12 + QUEUE_MAX)))
        finally:
            dripper.cancel()
    assert len(answers) == 4 * (12 + QUEUE_MAX)
    assert max(b.most for b in boxes) <= 4
    assert min(b.most for b in boxes) >= 2  # all three were used
    assert sum(b.infers() for b in boxes) == len(answers)


async def test_a_full_pool_queues_then_refuses_with_queue_full_and_queue_timeout(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [1]) as (name, boxes):
        held = asyncio.create_task(ask(broker, 0, name))
        await until(lambda: boxes[0].running == 1)
        waiters = [asyncio.create_task(ask(broker, i % 3, name)) for i in range(QUEUE_MAX)]
        await asyncio.sleep(0.5)  # all queued (the queue has no server-side signal to wait on)
        started = time.monotonic()
        async with sdk(broker, 1) as client:
            with pytest.raises(openai.APIStatusError) as full:
                await client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hi"}]
                )
        assert full.value.status_code == 503
        assert full.value.response.json()["error"]["code"] == "queue_full"
        assert full.value.response.headers.get("retry-after")
        assert time.monotonic() - started < 1.0  # at once
        results = await asyncio.gather(*waiters, return_exceptions=True)
        for result in results:
            assert isinstance(result, openai.APIStatusError), result
            assert result.status_code == 503
            assert result.response.json()["error"]["code"] == "queue_timeout"
            assert result.response.headers.get("retry-after")
        assert time.monotonic() - started < QUEUE_TIMEOUT + 3
        boxes[0].release.set()
        assert await held == boxes[0].pub.session_id


async def test_a_freed_slot_goes_to_the_oldest_waiter_on_any_worker(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [1]) as (name, boxes):
        box = boxes[0]
        first = asyncio.create_task(ask(broker, 0, name, "first"))
        await until(lambda: box.running == 1)
        waiters = []
        for i in (1, 2, 0):
            waiters.append(asyncio.create_task(ask(broker, i, name, f"from-{i}")))
            await asyncio.sleep(0.3)  # arrive in this order (no server-side signal to await)
        box.release.set()
        await asyncio.gather(first, *waiters)
    sent = [f["body"]["messages"][0]["content"] for f in box.tasks]
    assert sent == ["first", "from-1", "from-2", "from-0"]


async def test_a_task_whose_backend_goes_away_before_answering_fails_over(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [1, 1]) as (name, boxes):
        call = asyncio.create_task(ask(broker, 0, name))
        await until(lambda: sum(b.running for b in boxes) == 1)
        victim = next(b for b in boxes if b.running)
        other = next(b for b in boxes if b is not victim)
        victim.answer = False  # it took the task and goes away without a word
        other.release.set()
        await victim.pub.disconnect()  # its stream closes with the task in flight
        assert await asyncio.wait_for(call, 15) == other.pub.session_id
        assert len(other.tasks) == 1
        assert other.tasks[0]["taskId"] != victim.tasks[0]["taskId"]  # a new task id


async def test_no_failover_once_data_reached_the_client(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [1, 1]) as (name, boxes):
        async with sdk(broker, 1) as client:
            stream = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            await until(lambda: sum(b.infers() for b in boxes) == 1)
            victim = next(b for b in boxes if b.infers())
            task = victim.tasks[0]["taskId"]
            await victim.pub.chunks(task, [{"data": chat_chunk("partial")}])
            first = await stream.__anext__()
            assert first.choices[0].delta.content == "partial"
            await victim.pub.disconnect()
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
        assert sum(b.infers() for b in boxes) == 1  # never sent again


async def test_a_draining_backend_gets_no_new_task(broker: Broker, owner_tokens: list[str]) -> None:
    async with pool(broker, owner_tokens, [None, None], release=True) as (name, boxes):
        a, b = boxes
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {broker.token('admin')}"}
        ) as admin:
            response = await admin.post(
                f"{broker.url(1)}/api/v1/llms/{name}/backends/{a.pub.session_id}/drain"
            )
            assert response.status_code == 200, response.text
            assert response.json()["draining"] is True
            answers = await asyncio.gather(*(ask(broker, i % 3, name) for i in range(9)))
            assert set(answers) == {b.pub.session_id}
            row = (await admin.get(f"{broker.url(2)}/api/v1/llms/{name}")).json()
            drained = {x["providerSessionId"]: x["draining"] for x in row["backends"]}
            assert drained == {a.pub.session_id: True, b.pub.session_id: False}
            # the publisher ends the drain itself
            assert (await a.pub.set_status(name, "active")).status_code == 200
            answers = await asyncio.gather(*(ask(broker, i % 3, name) for i in range(12)))
            assert a.pub.session_id in answers


async def test_a_sleeping_pool_is_woken_once_for_many_requests(
    broker: Broker, owner_tokens: list[str]
) -> None:
    async with pool(broker, owner_tokens, [None, None], status="hibernating", release=True) as (
        name,
        boxes,
    ):
        answers = await asyncio.gather(*(ask(broker, i % 3, name) for i in range(30)))
        wakes = [f for box in boxes for f in box.tasks if f.get("kind") == "wake"]
        assert len(wakes) == 1
        woken = next(box for box in boxes if any(f.get("kind") == "wake" for f in box.tasks))
        assert set(answers) == {woken.pub.session_id}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


def test_a_rolling_restart_of_a_pool_of_real_agents_fails_no_request(
    broker: Broker,
    owner_tokens: list[str],
    upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    """Two boxes of one owner run `mcpd-publish` with `pool = true`; each is restarted in
    turn (SIGTERM: drain, finish, withdraw; then started again) under continuous load."""
    name = f"agents-{uuid.uuid4().hex[:8]}"
    llm = {"name": name, "model": "fake-model", "upstream": upstream.url, "pool": True}
    urls = [broker.url(0), broker.url(1), broker.url(2)]
    boxes = [
        start_agent(tmp_path, owner_tokens[i], urls[i:] + urls[:i], [llm], name=f"box{i}")
        for i in range(2)
    ]
    try:
        token = broker.token("client")
        wait_serving(broker, token, name)
        load = Load(broker, token, name).start()
        time.sleep(1.0)
        for i in range(2):
            assert boxes[i].stop() == 0, boxes[i].log()
            assert "draining 1 pooled LLM(s)" in boxes[i].log()
            boxes[i] = start_agent(
                tmp_path, owner_tokens[i], urls[i:] + urls[:i], [llm], name=f"box{i}"
            )
            time.sleep(1.0)
        outcomes = load.stop()
    finally:
        for box in boxes:
            box.stop()
    failed = [o for o in outcomes if o.status != 200]
    assert len(outcomes) >= 30, summary(outcomes)
    assert not failed, (summary(outcomes), failed[:5])


async def test_a_task_fails_over_when_the_worker_holding_its_stream_is_killed(
    broker: Broker, owner_tokens: list[str]
) -> None:
    """Box 0's stream is on worker 0, box 1's on worker 1. Box 1 is busy; the call (on
    worker 2) goes to box 0; worker 0 is SIGKILLed with the task in flight: the call waits
    for box 1's slot and gets its answer, 200."""
    async with pool(broker, owner_tokens, [1, 1]) as (name, boxes):
        a, b = boxes
        assert (await a.pub.set_status(name, "draining")).status_code == 200
        busy = asyncio.create_task(ask(broker, 1, name, "busy"))  # box 1: box 0 drains
        await until(lambda: b.running == 1)
        assert (await a.pub.set_status(name, "active")).status_code == 200
        call = asyncio.create_task(ask(broker, 2, name, "victim"))  # box 0: box 1 is full
        await until(lambda: a.running == 1)
        a.answer = False
        broker.kill(0)  # SIGKILL: no drain, no goodbye
        try:
            b.release.set()
            assert await busy == b.pub.session_id
            assert await asyncio.wait_for(call, 20) == b.pub.session_id
            sent = [f["body"]["messages"][0]["content"] for f in b.tasks]
            assert sent == ["busy", "victim"]  # sent again, to box 1
        finally:
            broker.start_worker(0)

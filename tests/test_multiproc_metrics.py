"""/metrics and the request log on three daphne processes on PostgreSQL + Redis, driven by the
`openai` SDK and a publisher written from the contract: every worker's counters and
histograms move with the calls it served (streamed and not, a wake, a client that left, a
queue wait and a failover in a pool), and the broker-wide gauges read the same on every
worker (issue 23)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, Frame, chat_answer, chat_chunk
from tests.test_multiproc_fleet import pool, until

pytestmark = pytest.mark.multiproc

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_services()
    b = Broker(3, services=True, env={"MCPD_INFER_TIMEOUT_SECONDS": "20"}).start()
    yield b
    b.stop()


async def scrape(broker: Broker, worker: int) -> Samples:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{broker.url(worker)}/metrics",
            headers={"Authorization": f"Bearer {broker.token('admin')}"},
        )
    assert response.status_code == 200, response.text
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def scrape_all(broker: Broker) -> list[Samples]:
    return list(await asyncio.gather(*(scrape(broker, i) for i in range(3))))


def client(broker: Broker, worker: int, timeout: float = 30.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{broker.url(worker)}/v1",
        api_key=broker.token("client"),
        max_retries=0,
        timeout=timeout,
    )


USAGE = {"prompt_tokens": 9, "completion_tokens": 4}
SECRET = "a prompt the log must never show"


class Publisher:
    """A contract publisher serving one model: whole answers with usage, streams with a
    usage chunk, wakes; a call whose prompt is "hold" is never answered."""

    def __init__(self, pub: ContractPublisher) -> None:
        self.pub = pub
        self.cancels: asyncio.Queue[str] = asyncio.Queue()
        self.held: asyncio.Queue[str] = asyncio.Queue()

    async def handle(self, frame: Frame) -> None:
        if frame["kind"] == "cancel":
            self.cancels.put_nowait(frame["taskId"])
            return
        if frame["kind"] == "wake":
            await self.pub.result(frame["taskId"], 200, {"ok": True})
            return
        prompt = frame["body"]["messages"][0]["content"]
        if prompt == "hold":
            self.held.put_nowait(frame["taskId"])
            return
        if not frame["streaming"]:
            await self.pub.result(frame["taskId"], 200, {**chat_answer("ok"), "usage": USAGE})
            return
        usage = json.dumps({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
        await self.pub.chunks(
            frame["taskId"],
            [
                {"data": chat_chunk("o"), "done": False},
                {"data": chat_chunk("k"), "done": False},
                {"data": chat_chunk("", finish=True), "done": False},
                {"data": usage, "done": False},
                {"data": "[DONE]", "done": True},
            ],
        )


async def published(
    broker: Broker, worker: int, transport: str, status: str = "active"
) -> tuple[Publisher, str]:
    name = f"obs-{uuid.uuid4().hex[:8]}"
    pub = ContractPublisher(broker.url(worker), broker.token("publisher"), transport=transport)
    reg = await pub.register([{"name": name, "type": "openai", "model": "m", "status": status}])
    assert reg.status_code == 200, reg.text
    await pub.connect()
    served = Publisher(pub)
    pub.serve(served.handle)
    return served, name


@pytest.fixture
async def sse_model(broker: Broker) -> AsyncIterator[tuple[Publisher, str]]:
    """A model whose publisher holds an SSE stream on worker 1."""
    served, name = await published(broker, 1, "sse")
    yield served, name
    await served.pub.aclose()


async def ask(broker: Broker, worker: int, name: str, *, stream: bool = False) -> str:
    async with client(broker, worker) as c:
        messages: Any = [{"role": "user", "content": SECRET}]
        if not stream:
            answer = await c.chat.completions.create(model=name, messages=messages)
            return answer.choices[0].message.content or ""
        parts = []
        async for chunk in await c.chat.completions.create(
            model=name, messages=messages, stream=True, stream_options={"include_usage": True}
        ):
            parts += [choice.delta.content or "" for choice in chunk.choices]
        return "".join(parts)


async def hold(broker: Broker, worker: int, name: str) -> str:
    """A call the publisher holds until the test answers it."""
    async with client(broker, worker) as c:
        answer = await c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hold"}]
        )
        return answer.choices[0].message.content or ""


async def test_counters_and_histograms_move_with_real_calls_on_the_worker_that_served_them(
    broker: Broker, sse_model: tuple[Publisher, str]
) -> None:
    _, name = sse_model
    before = await scrape_all(broker)
    # Worker i serves i + 1 whole answers and one stream.
    calls = [ask(broker, i, name) for i in range(3) for _ in range(i + 1)]
    calls += [ask(broker, i, name, stream=True) for i in range(3)]
    answers = await asyncio.wait_for(asyncio.gather(*calls), 60)
    assert answers == ["ok"] * 9
    after = await scrape_all(broker)
    for i in range(3):

        def moved(metric: str, i: int = i, **labels: str) -> float:
            return value(after[i], metric, **labels) - value(before[i], metric, **labels)

        served = i + 2
        assert moved("mcpd_requests_total", model=name, endpoint=CHAT, code="200") == served
        assert moved("mcpd_request_duration_seconds_count", model=name, endpoint=CHAT) == served
        assert moved("mcpd_request_duration_seconds_sum", model=name, endpoint=CHAT) > 0
        assert moved("mcpd_time_to_first_token_seconds_count", model=name) == served
        assert moved("mcpd_broker_overhead_seconds_count", endpoint=CHAT) == served
        assert moved("mcpd_tokens_total", model=name, kind="prompt") == 9 * served
        assert moved("mcpd_tokens_total", model=name, kind="completion") == 4 * served
        # Histogram buckets are cumulative: the +Inf bucket holds every call.
        assert (
            moved("mcpd_request_duration_seconds_bucket", model=name, endpoint=CHAT, le="+Inf")
            == served
        )
    # The request log: one line per call on the worker that served it, no prompt in it.
    for i in range(3):
        lines = [
            line
            for line in broker.log(i, tail=None).splitlines()
            if f"mcpd.request: model={name} " in line
        ]
        assert len(lines) == i + 2, lines
        assert all(f" worker={broker.ports[i]}" in line for line in lines)
        assert all(" token=shared-client " in line for line in lines)
        assert sum(" stream=1 " in line for line in lines) == 1
        assert SECRET not in broker.log(i, tail=None)


async def test_gauges_agree_across_workers(
    broker: Broker, sse_model: tuple[Publisher, str]
) -> None:
    served, name = sse_model
    ws, ws_name = await published(broker, 2, "ws")
    try:
        held = asyncio.create_task(hold(broker, 0, name))
        task_id = await asyncio.wait_for(served.held.get(), 10)
        views = await scrape_all(broker)
        for found in views:
            assert value(found, "mcpd_backends", model=name, status="active") == 1
            assert value(found, "mcpd_backends", model=name, status="disconnected") == 0
            assert value(found, "mcpd_backends", model=ws_name, status="active") == 1
            assert value(found, "mcpd_inflight_requests", model=name) == 1
            assert value(found, "mcpd_inflight_requests", model=ws_name) == 0
            assert value(found, "mcpd_queue_depth", model=name) == 0
            assert value(found, "mcpd_slots", model=name) == float("inf")
            assert value(found, "mcpd_fleet_read_ok") == 1
        # The gauges about the whole broker are the same everywhere ...
        broker_wide = ("mcpd_backends", "mcpd_inflight_requests", "mcpd_queue_depth", "mcpd_slots")

        def fleet(found: Samples) -> Samples:
            return {key: v for key, v in found.items() if key[0] in broker_wide}

        assert fleet(views[0]) == fleet(views[1]) == fleet(views[2])
        # ... and the streams each worker holds are its own.
        streams = [
            (
                value(found, "mcpd_control_streams", transport="sse"),
                value(found, "mcpd_control_streams", transport="ws"),
            )
            for found in views
        ]
        assert streams == [(0, 0), (1, 0), (0, 1)]
        await served.pub.result(task_id, 200, chat_answer("released"))
        assert await asyncio.wait_for(held, 10) == "released"
        for found in await scrape_all(broker):
            assert value(found, "mcpd_inflight_requests", model=name) == 0
        # A publisher that leaves: its backend is no longer active on any worker.
        await ws.pub.disconnect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            views = await scrape_all(broker)
            if all(
                value(found, "mcpd_backends", model=ws_name, status="active") == 0
                for found in views
            ):
                break
            await asyncio.sleep(0.2)
        for found in views:
            assert value(found, "mcpd_backends", model=ws_name, status="active") == 0
        assert value(views[2], "mcpd_control_streams", transport="ws") == 0
    finally:
        await ws.pub.aclose()


async def test_a_wake_is_counted_once_across_workers(broker: Broker) -> None:
    served, name = await published(broker, 1, "sse", status="hibernating")
    try:
        before = await scrape_all(broker)
        answers = await asyncio.wait_for(
            asyncio.gather(*(ask(broker, i % 3, name) for i in range(6))), 60
        )
        assert answers == ["ok"] * 6
        after = await scrape_all(broker)

        def total(metric: str, views: list[Samples], **labels: str) -> float:
            return sum(value(found, metric, **labels) for found in views)

        assert total("mcpd_wakes_total", after, model=name, outcome="ok") == 1
        assert total("mcpd_wake_duration_seconds_count", after, model=name) == 1
        assert (
            total("mcpd_requests_total", after, model=name, endpoint=CHAT, code="200")
            - total("mcpd_requests_total", before, model=name, endpoint=CHAT, code="200")
            == 6
        )
        leader = [
            i for i in range(3) if value(after[i], "mcpd_wakes_total", model=name, outcome="ok")
        ]
        assert len(leader) == 1
        wake_lines = [
            line
            for line in broker.log(leader[0], tail=None).splitlines()
            if f"mcpd.wake: event=wake model={name} " in line
        ]
        assert len(wake_lines) == 1, wake_lines
        assert " outcome=ok " in wake_lines[0]
    finally:
        await served.pub.aclose()


async def test_a_client_that_leaves_is_a_cancellation(
    broker: Broker, sse_model: tuple[Publisher, str]
) -> None:
    served, name = sse_model
    before = await scrape(broker, 2)
    with pytest.raises(openai.APITimeoutError):
        async with client(broker, 2, timeout=1.0) as c:
            await c.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hold"}]
            )
    task_id = await asyncio.wait_for(served.held.get(), 10)
    assert await asyncio.wait_for(served.cancels.get(), 10) == task_id
    key = {"model": name, "reason": "client_left"}
    deadline = time.monotonic() + 5
    while True:
        after = await scrape(broker, 2)
        if value(after, "mcpd_cancellations_total", **key) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert (
        value(after, "mcpd_cancellations_total", **key)
        - value(before, "mcpd_cancellations_total", **key)
        == 1
    )
    assert (
        value(after, "mcpd_requests_total", model=name, endpoint=CHAT, code="499")
        - value(before, "mcpd_requests_total", model=name, endpoint=CHAT, code="499")
        == 1
    )


async def test_metrics_refuses_a_client_token_in_the_api_shape(broker: Broker) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            f"{broker.url(0)}/metrics",
            headers={"Authorization": f"Bearer {broker.token('client')}"},
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        assert (await http.get(f"{broker.url(0)}/metrics")).status_code == 401


@pytest.fixture(scope="module")
def owner_tokens(broker: Broker) -> list[str]:
    """Publisher tokens of one owner, one per box of a pool."""
    return broker.owner_tokens(2)


async def test_a_pools_queue_wait_and_failover_are_counted(
    broker: Broker, owner_tokens: list[str]
) -> None:
    """Two boxes of one slot each (streams on workers 0 and 1) hold their tasks: a third call
    from worker 2 waits in the queue, which every worker reports; then a box that goes away
    with its task makes the call fail over to the other."""
    async with pool(broker, owner_tokens, [1, 1]) as (name, boxes):
        before = await scrape(broker, 2)
        calls = [asyncio.create_task(ask(broker, 2, name)) for _ in range(3)]
        await until(lambda: sum(b.running for b in boxes) == 2)
        deadline = time.monotonic() + 10
        while True:
            views = await scrape_all(broker)
            if all(value(v, "mcpd_queue_depth", model=name) == 1 for v in views):
                break
            assert time.monotonic() < deadline, "the third call never queued"
            await asyncio.sleep(0.1)
        for found in views:
            assert value(found, "mcpd_backends", model=name, status="active") == 2
            assert value(found, "mcpd_inflight_requests", model=name) == 2
            assert value(found, "mcpd_slots", model=name) == 2
        await asyncio.sleep(0.2)  # a queue wait long enough to see
        for box in boxes:
            box.release.set()
        await asyncio.wait_for(asyncio.gather(*calls), 15)
        # A box that takes the task and goes away before answering: the task fails over.
        await until(lambda: sum(b.running for b in boxes) == 0)  # their last POSTs returned
        for box in boxes:
            box.release = asyncio.Event()
        seen = [box.infers() for box in boxes]
        call = asyncio.create_task(ask(broker, 2, name))
        await until(lambda: sum(b.infers() for b in boxes) == sum(seen) + 1)
        victim = next(b for b, n in zip(boxes, seen, strict=True) if b.infers() > n)
        other = next(b for b in boxes if b is not victim)
        victim.answer = False
        other.release.set()
        await victim.pub.disconnect()
        assert await asyncio.wait_for(call, 15) == other.pub.session_id
        after = await scrape(broker, 2)

        def moved(metric: str, **labels: str) -> float:
            return value(after, metric, **labels) - value(before, metric, **labels)

        assert moved("mcpd_requests_total", model=name, endpoint=CHAT, code="200") == 4
        assert moved("mcpd_queue_wait_seconds_count", model=name) == 1
        assert moved("mcpd_queue_wait_seconds_sum", model=name) >= 0.2
        assert moved("mcpd_failovers_total", model=name) == 1
        for found in await scrape_all(broker):
            assert value(found, "mcpd_queue_depth", model=name) == 0
            assert value(found, "mcpd_inflight_requests", model=name) == 0
            assert value(found, "mcpd_backends", model=name, status="active") == 1

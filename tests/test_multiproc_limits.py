"""Client limits and usage across three daphne processes on PostgreSQL + Redis, driven by the
`openai` SDK and a publisher written from the contract (PROTOCOL.md "Client limits and
usage"): requests alternate over all three workers, so every count below is a shared one."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, Frame, chat_answer, chat_chunk

pytestmark = pytest.mark.multiproc

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_services()
    b = Broker(3, services=True, env={"MCPD_INFER_TIMEOUT_SECONDS": "20"}).start()
    yield b
    b.stop()


class Publisher:
    """Serves one LLM from worker 1: answers at once, except while ``hold`` is clear."""

    def __init__(self, broker: Broker) -> None:
        self.name = f"lim-{uuid.uuid4().hex[:8]}"
        self.pub = ContractPublisher(broker.url(1), broker.token("publisher"))
        self.hold = asyncio.Event()
        self.hold.set()
        self.held: list[Frame] = []
        self.bodies: list[dict[str, Any]] = []

    async def answer(self, frame: Frame) -> None:
        if frame["kind"] != "infer":
            return
        self.bodies.append(frame["body"])
        if not self.hold.is_set():
            self.held.append(frame)
            await self.hold.wait()
        task = frame["taskId"]
        if not frame["streaming"]:
            await self.pub.result(task, 200, {**chat_answer("ok"), "usage": USAGE})
            return
        # As OpenAI does: a usage-only chunk before [DONE], when (and only when) asked.
        options = frame["body"].get("stream_options") or {}
        chunks = [
            {"data": chat_chunk("o"), "done": False},
            {"data": chat_chunk("k"), "done": False},
        ]
        chunks.append({"data": chat_chunk("", finish=True), "done": False})
        if options.get("include_usage"):
            usage_chunk = json.loads(chat_chunk(""))
            usage_chunk.update(choices=[], usage=USAGE)
            chunks.append({"data": json.dumps(usage_chunk), "done": False})
        chunks.append({"data": "[DONE]", "done": True})
        await self.pub.chunks(task, chunks)


@pytest.fixture
async def llm(broker: Broker) -> AsyncIterator[Publisher]:
    served = Publisher(broker)
    response = await served.pub.register([{"name": served.name, "type": "openai", "model": "m"}])
    assert response.status_code == 200, response.text
    await served.pub.connect()
    served.pub.serve(served.answer)
    yield served
    served.hold.set()
    await served.pub.aclose()


def new_client_token(broker: Broker, *limits: str) -> str:
    out = broker.manage("createtoken", "client", f"lim-{uuid.uuid4().hex[:6]}", *limits)
    return out.stdout.strip().splitlines()[-1]


def client(broker: Broker, worker: int, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{broker.url(worker)}/v1", api_key=token, max_retries=0, timeout=30.0
    )


async def ask(broker: Broker, worker: int, token: str, name: str) -> Any:
    """A raw response (its headers) of one chat call to ``worker``."""
    async with client(broker, worker, token) as c:
        return await c.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}]
        )


def reset_ms(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?|(\d+)ms", text)
    assert match, text
    hours, minutes, seconds, ms = match.groups()
    if ms is not None:
        return float(ms)
    return (int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)) * 1000


async def test_rpm_is_counted_across_workers_with_openais_headers_and_429(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker, "--rpm", "6")
    remaining = []
    for i in range(6):
        raw = await ask(broker, i % 3, token, llm.name)
        assert raw.http_response.status_code == 200
        assert raw.headers["x-ratelimit-limit-requests"] == "6"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        # Each request moves the window on by 10 s: full again (i + 1) * 10 s from now.
        assert (i + 1) * 10_000 - 2_000 <= reset_ms(raw.headers["x-ratelimit-reset-requests"])
        assert reset_ms(raw.headers["x-ratelimit-reset-requests"]) <= (i + 1) * 10_000
        assert "x-ratelimit-limit-tokens" not in raw.headers
        raw.parse()
    assert remaining == ["5", "4", "3", "2", "1", "0"]
    for worker in range(3):
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(broker, worker, token, llm.name)
        assert time.monotonic() - started < 1.0  # refused at once
        error = refused.value
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert isinstance(error.body, dict)
        assert error.body["code"] == "rate_limit_exceeded"
        assert 1 <= int(error.response.headers["Retry-After"]) <= 10
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # Refused requests count nothing and reach no publisher.
    assert len(llm.bodies) == 6


async def test_an_unlimited_token_gets_no_rate_limit_headers(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker)
    for worker in range(3):
        raw = await ask(broker, worker, token, llm.name)
        assert raw.http_response.status_code == 200
        assert not [h for h in raw.headers if h.lower().startswith("x-ratelimit")]


async def test_the_sdk_retries_after_a_429_as_against_openai(
    broker: Broker, llm: Publisher
) -> None:
    # 60 a minute: once the minute's 60 are spent, one more passes each second; the SDK's
    # retry waits the Retry-After (1 s) and gets through.
    token = new_client_token(broker, "--rpm", "60")
    await asyncio.gather(*(ask(broker, i % 3, token, llm.name) for i in range(60)))
    for i in range(20):  # the minute's last ones, until one is refused
        try:
            await ask(broker, i % 3, token, llm.name)
        except openai.RateLimitError:
            break
    else:
        raise AssertionError("no request was refused")
    async with openai.AsyncOpenAI(
        base_url=f"{broker.url(1)}/v1", api_key=token, max_retries=2, timeout=30.0
    ) as retrying:
        # Each call finds the window spent (a refill may land just before one: try again).
        for _ in range(5):
            raw = await retrying.chat.completions.with_raw_response.create(
                model=llm.name, messages=[{"role": "user", "content": "again"}]
            )
            assert raw.parse().choices[0].message.content == "ok"
            if raw.retries_taken:
                break
    assert raw.retries_taken >= 1, "the SDK never had to wait for a Retry-After"


async def test_max_concurrency_refuses_while_held_and_admits_when_it_ends(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker, "--max-concurrency", "1")
    llm.hold.clear()
    first = asyncio.create_task(ask(broker, 0, token, llm.name))
    for _ in range(100):
        if llm.held:
            break
        await asyncio.sleep(0.05)
    assert llm.held, "the first request reached the publisher"
    for worker in (1, 2):
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            await ask(broker, worker, token, llm.name)
        assert time.monotonic() - started < 1.0
        assert refused.value.response.headers["Retry-After"] == "1"
        assert refused.value.response.headers["x-ratelimit-limit-requests"] == "1"
        assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    llm.hold.set()
    assert (await asyncio.wait_for(first, 20)).http_response.status_code == 200
    again = await ask(broker, 2, token, llm.name)
    assert again.http_response.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "0"  # itself in flight


async def test_tpm_counts_the_usage_answers_report(broker: Broker, llm: Publisher) -> None:
    token = new_client_token(broker, "--tpm", "30", "--rpm", "100")
    first = await ask(broker, 0, token, llm.name)
    assert first.headers["x-ratelimit-limit-tokens"] == "30"
    assert first.headers["x-ratelimit-remaining-tokens"] == "30"
    second = await ask(broker, 1, token, llm.name)  # 18 tokens used: 12 left
    assert 11 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 12
    assert reset_ms(second.headers["x-ratelimit-reset-tokens"]) > 30_000
    with pytest.raises(openai.RateLimitError) as refused:  # 36 of 30 used
        await ask(broker, 2, token, llm.name)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["type"] == "tokens"
    assert refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


async def usage_rows(broker: Broker, query: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as web:
        response = await web.get(f"{broker.url(2)}/api/v1/usage{query}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_usage_rows_for_streamed_and_unary_calls_and_the_stream_asked_for(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker)
    label = broker.sql("SELECT label FROM virtual_llms_apitoken WHERE prefix = %s", token[5:17])
    async with client(broker, 0, token) as c:
        await c.chat.completions.create(model=llm.name, messages=[{"role": "user", "content": "u"}])
    async with client(broker, 1, token) as c:
        plain = await c.chat.completions.create(
            model=llm.name, messages=[{"role": "user", "content": "s"}], stream=True
        )
        chunks = [chunk async for chunk in plain]
    # Not asked for: the usage chunk the broker added never reaches the client.
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ok"
    async with client(broker, 2, token) as c:
        asked = await c.chat.completions.create(
            model=llm.name,
            messages=[{"role": "user", "content": "s"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        with_usage = [chunk async for chunk in asked]
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.total_tokens == 18
    # The publisher was asked for the usage both times.
    assert [b.get("stream_options") for b in llm.bodies[-2:]] == [{"include_usage": True}] * 2
    await asyncio.sleep(1.5)  # each worker writes its records every second
    rows = broker.sql(
        "SELECT streamed, status, prompt_tokens, completion_tokens, llm_name, ttfb_ms,"
        " duration_ms FROM virtual_llms_usagerecord r JOIN virtual_llms_apitoken t"
        " ON t.id = r.token_id WHERE t.prefix = %s ORDER BY r.id",
        token[5:17],
    )
    assert sorted((r[0], r[1], r[2], r[3], r[4]) for r in rows) == [
        (False, 200, 11, 7, llm.name),
        (True, 200, 11, 7, llm.name),
        (True, 200, 11, 7, llm.name),
    ]
    for row in rows:
        assert 0 < float(str(row[5])) <= float(str(row[6]))
    # The API's sums: this token's row among the admin's, and alone on usage/me.
    admin = broker.token("admin")
    by_token = await usage_rows(broker, "?groupBy=token", admin)
    mine = [r for r in by_token["rows"] if r["key"] == label[0][0]]
    expected = {"requests": 3, "errors": 0, "promptTokens": 33, "completionTokens": 21}
    assert mine == [{"key": label[0][0], **expected}]
    by_model = await usage_rows(broker, "?groupBy=model", admin)
    assert llm.name in [r["key"] for r in by_model["rows"]]
    me = await usage_rows(broker, "/me", token)
    assert me["rows"] == [{"key": label[0][0], **expected}]
    assert me["groupBy"] == "token"


async def test_a_killed_workers_requests_in_flight_stop_counting(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker, "--max-concurrency", "1")
    llm.hold.clear()
    held = asyncio.create_task(ask(broker, 0, token, llm.name))
    for _ in range(100):
        if llm.held:
            break
        await asyncio.sleep(0.05)
    assert llm.held, "the request reached the publisher"
    with pytest.raises(openai.RateLimitError):
        await ask(broker, 2, token, llm.name)
    broker.kill(0)  # SIGKILL: no finally runs, its place is never given back
    killed_at = time.monotonic()
    llm.hold.set()  # the publisher answers again (the killed request's answer finds no one)
    try:
        with pytest.raises(openai.APIConnectionError):
            await held
        # Its place is free once its liveness key is gone (1.5 s), not after the set's TTL.
        while True:
            try:
                admitted = await ask(broker, 2, token, llm.name)
                break
            except openai.RateLimitError:
                assert time.monotonic() - killed_at < 5, "the dead worker's place was kept"
                await asyncio.sleep(0.25)
        assert admitted.http_response.status_code == 200
        assert time.monotonic() - killed_at >= 1.0  # not before its liveness key expired
    finally:
        llm.hold.set()
        broker.start_worker(0)


async def test_a_stopped_worker_writes_its_usage_records_as_it_drains(
    broker: Broker, llm: Publisher
) -> None:
    token = new_client_token(broker)
    await ask(broker, 2, token, llm.name)
    broker.restart(2)  # SIGTERM at once, mostly before its next one-second write
    rows = broker.sql(
        "SELECT count(*) FROM virtual_llms_usagerecord r JOIN virtual_llms_apitoken t"
        " ON t.id = r.token_id WHERE t.prefix = %s",
        token[5:17],
    )
    assert rows == [(1,)]

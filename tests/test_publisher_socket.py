"""A WebSocket agent answers on its control socket (PROTOCOL.md: on it the publisher may also
send ``result``/``chunks``/``error`` frames), against a scripted socket server (websockets)
and a scripted HTTP broker: what goes on the socket, what falls back to HTTP, and what a
``protocol_error`` naming a task does to it. The same agent against the real broker:
tests/test_publisher_e2e.py (its ``ws`` half)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

# `scripted`: the agent against test_publisher_agent's scripted HTTP broker (a fixture).
from tests.test_publisher_agent import Running, ScriptedBroker, scripted  # noqa: F401
from tests.test_publisher_upstream import FakeUpstream
from virtual_llms.publisher.broker import BrokerClient
from virtual_llms.publisher.config import LlmConfig
from virtual_llms.publisher.control import SOCKET_RESULT_BYTES, StreamLost, Uplink, open_stream
from virtual_llms.publisher.sink import TaskSink

Frame = dict[str, Any]


class SocketBroker:
    """Accepts control sockets on any path: says ``ready``, records what the agent sends."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Frame] = asyncio.Queue()
        self.connection: ServerConnection | None = None
        self.connected = asyncio.Event()
        self.url = ""

    async def handler(self, connection: ServerConnection) -> None:
        self.connection = connection
        await connection.send(json.dumps({"type": "ready", "providerSessionId": "s"}))
        self.connected.set()
        async for message in connection:
            self.received.put_nowait(json.loads(message))

    async def send(self, frame: Frame) -> None:
        assert self.connection is not None
        await self.connection.send(json.dumps(frame))

    async def next(self, timeout: float = 10.0) -> Frame:
        return await asyncio.wait_for(self.received.get(), timeout)


@pytest.fixture
async def socket_broker() -> AsyncIterator[SocketBroker]:
    broker = SocketBroker()
    async with serve(broker.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        broker.url = f"http://127.0.0.1:{port}"
        yield broker


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


async def until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll: the conditions are the agent's internals, which signal nothing."""
    async with asyncio.timeout(timeout):
        while not what():  # noqa: ASYNC110 - nothing to wait on but time
            await asyncio.sleep(0.01)


async def test_answers_go_on_the_socket_while_it_is_open(socket_broker: SocketBroker) -> None:
    posts: list[tuple[str, Frame]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        posts.append((request.url.path, json.loads(request.content)))
        return httpx.Response(204)

    broker = BrokerClient([socket_broker.url], "tok", transport=httpx.MockTransport(handle))
    refused: list[tuple[str, str, str]] = []
    uplink = Uplink(lambda *args: refused.append(args))
    frames = open_stream(broker, "s", "ws", uplink)
    try:
        assert (await anext(frames))["type"] == "ready"
        assert uplink.socket is not None
        sink = TaskSink(broker, "t1", uplink)
        await sink.chunks([{"data": "a"}, {"data": "b"}])
        await sink.result(200, {"ok": True, "text": "héllo ✓ 🚀"})
        await sink.error("x" * 5000)
        assert await socket_broker.next() == {
            "type": "chunks",
            "taskId": "t1",
            "chunks": [{"data": "a"}, {"data": "b"}],
        }
        assert await socket_broker.next() == {
            "type": "result",
            "taskId": "t1",
            "status": 200,
            "body": {"ok": True, "text": "héllo ✓ 🚀"},
        }
        assert await socket_broker.next() == {"type": "error", "taskId": "t1", "error": "x" * 4000}
        assert posts == []

        # A result too big for the socket goes over HTTP, where a 413 refuses only this task.
        big = {"text": "x" * SOCKET_RESULT_BYTES}
        await sink.result(200, big)
        assert posts == [("/api/v1/virtual/tasks/t1/result", {"status": 200, "body": big})]
        # The limit counts the frame's UTF-8 bytes, not its characters.
        wide = {"text": "é" * (SOCKET_RESULT_BYTES // 2)}
        await sink.result(200, wide)
        assert posts[-1] == ("/api/v1/virtual/tasks/t1/result", {"status": 200, "body": wide})

        # A protocol_error naming a task reaches on_refused while the stream is read.
        reading = asyncio.create_task(anext(frames))
        await socket_broker.send(
            {"type": "protocol_error", "taskId": "t1", "code": "task_not_found", "message": "No"}
        )
        await until(lambda: bool(refused))
        assert refused == [("t1", "task_not_found", "No")]

        # Once the socket is gone, answers go over HTTP (whose 404 stops a forgotten task).
        assert socket_broker.connection is not None
        await socket_broker.connection.close()
        with pytest.raises(StreamLost):
            await reading
        assert uplink.socket is None
        await sink.chunks([{"data": "late"}])
        assert posts[-1] == ("/api/v1/virtual/tasks/t1/chunks", {"chunks": [{"data": "late"}]})
    finally:
        await frames.aclose()
        await broker.aclose()


def infer(task_id: str, text: str, *, stream: bool) -> Frame:
    body: Frame = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return {
        "type": "task",
        "kind": "infer",
        "taskId": task_id,
        "llmName": "m",
        "streaming": stream,
        "endpoint": "/v1/chat/completions",
        "body": body,
    }


async def test_the_agent_answers_infer_tasks_on_the_socket(
    socket_broker: SocketBroker,
    fake_upstream: FakeUpstream,
    scripted: tuple[ScriptedBroker, Callable[..., Running]],  # noqa: F811 - the fixture
) -> None:
    http, start = scripted  # the scripted HTTP broker of test_publisher_agent, for HTTP posts
    llm = LlmConfig(name="m", model="fake-model", upstream=fake_upstream.url)
    running = start(brokers=(socket_broker.url,), llms=(llm,), transport="ws")
    await asyncio.wait_for(socket_broker.connected.wait(), 10)
    await until(
        lambda: running.agent.uplink is not None and running.agent.uplink.socket is not None
    )

    # Non-streaming: one result frame, no HTTP.
    await socket_broker.send(infer("t1", "hello", stream=False))
    answer = await socket_broker.next()
    assert answer["type"] == "result"
    assert answer["taskId"] == "t1"
    assert answer["status"] == 200
    assert answer["body"]["choices"][0]["message"]["content"] == "echo: hello"

    # Streaming: chunk frames in order, the last one done.
    await socket_broker.send(infer("t2", "one two", stream=True))
    data: list[str] = []
    while not data or data[-1] != "[DONE]":
        frame = await socket_broker.next()
        assert (frame["type"], frame["taskId"]) == ("chunks", "t2")
        data += [chunk["data"] for chunk in frame["chunks"]]
    words = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[:-1]]
    assert words == ["echo: ", "one ", "two ", None]

    # The broker refuses a chunk of a task it forgot: the task stops, the upstream is hung
    # up on, and nothing is posted.
    await socket_broker.send(infer("t3", "slow:200:0.05", stream=True))
    assert (await socket_broker.next())["taskId"] == "t3"
    await socket_broker.send(
        {"type": "protocol_error", "taskId": "t3", "code": "task_not_found", "message": "gone"}
    )
    await asyncio.to_thread(
        fake_upstream.wait_for, lambda: "slow:200:0.05" in fake_upstream.hangups, 5.0
    )
    await until(lambda: "t3" not in running.agent.tasks)

    # Any other refusal: the task stops and fails over HTTP, so its client hears at once.
    await socket_broker.send(infer("t4", "slow:200:0.05:b", stream=True))
    assert (await socket_broker.next())["taskId"] == "t4"
    await socket_broker.send(
        {"type": "protocol_error", "taskId": "t4", "code": "internal_error", "message": "oops"}
    )
    await http.until(lambda: any("t4" in path for path, _ in http.posts))
    assert http.posts == [
        ("/api/v1/virtual/tasks/t4/error", {"error": "the broker refused the answer: oops"})
    ]
    await asyncio.to_thread(
        fake_upstream.wait_for, lambda: "slow:200:0.05:b" in fake_upstream.hangups, 5.0
    )

    # Wake tasks still answer over HTTP: a 404 there tells a late wake apart.
    await socket_broker.send({"type": "task", "kind": "wake", "taskId": "w1", "llmName": "m"})
    await http.until(lambda: any("w1" in path for path, _ in http.posts))
    assert await running.stop() == 0

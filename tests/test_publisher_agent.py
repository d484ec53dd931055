"""The agent's control loop against a scripted broker (an httpx mock transport): the paths
the real broker seldom takes — a forgotten session, a session of another token, a refused
token, a connection that breaks under an answer — plus failover between broker URLs and
tasks it cannot serve."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from virtual_llms.publisher import broker as broker_module
from virtual_llms.publisher.agent import Agent
from virtual_llms.publisher.backoff import Backoff
from virtual_llms.publisher.broker import BrokerClient, TaskGone
from virtual_llms.publisher.config import Config, LlmConfig
from virtual_llms.publisher.control import StreamLost, open_stream
from virtual_llms.publisher.statefile import StateFile

URLS = ("http://broker-a", "http://broker-b")


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class ScriptedBroker:
    """Answers the publisher API; each hook may be replaced by a test."""

    def __init__(self) -> None:
        self.registers: list[tuple[str, str | None, list[dict[str, Any]]]] = []
        self.heartbeats = 0
        self.streams: list[str] = []  # the host of each stream opened
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.on_register: Callable[[str | None], httpx.Response] = self.register_ok
        self.on_heartbeat: Callable[[], httpx.Response] = lambda: httpx.Response(
            200, json={"ok": True, "llms": 1}
        )
        self.on_stream: Callable[[str], Awaitable[httpx.Response]] = self.stream_ok
        # A task answer's path -> its response (raise to break the connection under it).
        self.on_post: Callable[[str], httpx.Response] = lambda path: httpx.Response(204)
        self.changed = asyncio.Event()

    def register_ok(self, session: str | None) -> httpx.Response:
        return httpx.Response(200, json={"providerSessionId": session or "new-session", "llms": []})

    async def stream_ok(self, host: str) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            yield b'event: ready\ndata: {"providerSessionId": "x"}\n\n'
            while (frame := await self.frames.get()) is not None:
                yield f"event: task\nid: {frame['taskId']}\ndata: {json.dumps(frame)}\n\n".encode()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        try:
            if path == "/api/v1/virtual/register":
                self.registers.append(
                    (request.url.host, body["providerSessionId"], body["providers"])
                )
                return self.on_register(body["providerSessionId"])
            if path == "/api/v1/virtual/heartbeat":
                self.heartbeats += 1
                return self.on_heartbeat()
            if path.endswith("/stream"):
                self.streams.append(request.url.host)
                return await self.on_stream(request.url.host)
            self.posts.append((path, body))
            return self.on_post(path)
        finally:
            self.changed.set()

    async def live(self, task_id: str) -> None:
        """Wait until the agent reads the current stream: it answers a wake task on it."""
        self.frames.put_nowait({"kind": "wake", "taskId": task_id, "llmName": "m"})
        await self.until(lambda: any(task_id in path for path, _ in self.posts))

    async def until(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not what():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


def make_config(tmp_path: Path, **kwargs: Any) -> Config:
    llm = LlmConfig(name="m", model="M", upstream="http://127.0.0.1:9/v1")
    defaults: dict[str, Any] = {
        "brokers": URLS,
        "token": "tok",
        "llms": (llm,),
        "state_file": tmp_path / "state.json",
        "heartbeat_seconds": 30.0,
        "shutdown_grace_seconds": 1.0,
    }
    return Config(**{**defaults, **kwargs})


class Running:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.job = asyncio.create_task(agent.run())

    async def stop(self) -> int:
        self.agent.request_stop("test")
        return await asyncio.wait_for(self.job, 10)


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[ScriptedBroker, Callable[..., Running]]]:
    broker = ScriptedBroker()
    started: list[Running] = []

    def start(**kwargs: Any) -> Running:
        config = make_config(tmp_path, **kwargs)
        client = BrokerClient(
            config.brokers, config.token, transport=httpx.MockTransport(broker.handle)
        )
        running = Running(Agent(config, broker=client, backoff=Backoff(base=0.01, cap=0.05)))
        started.append(running)
        return running

    yield broker, start
    broker.frames.put_nowait(None)
    for running in started:
        if not running.job.done():
            await running.stop()


async def test_a_forgotten_session_is_registered_again(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted
    answers = iter([error(404, "session_not_found", "Unknown session")])
    broker.on_heartbeat = lambda: next(answers, httpx.Response(200, json={"ok": True, "llms": 1}))
    # One URL: with two, the first heartbeat (the 404) would go to the other, as a probe.
    running = start(heartbeat_seconds=1.0, brokers=URLS[:1])
    await broker.until(lambda: len(broker.registers) >= 2 and len(broker.streams) >= 2)
    assert [session for _, session, _ in broker.registers[:2]] == [None, "new-session"]
    await broker.live("sync")  # connected again
    assert await running.stop() == 0
    # the last register withdrew the LLMs before the stream closed
    assert broker.registers[-1][2] == []


async def test_a_session_of_another_token_is_replaced(
    tmp_path: Path, scripted: tuple[ScriptedBroker, Callable[..., Running]]
) -> None:
    broker, start = scripted
    StateFile(tmp_path / "state.json").save_session("old-session")
    broker.on_register = lambda session: (
        error(403, "forbidden", "another token's session")
        if session == "old-session"
        else broker.register_ok(session)
    )
    running = start()
    await broker.until(lambda: len(broker.streams) >= 1)
    assert [session for _, session, _ in broker.registers] == ["old-session", None]
    assert StateFile(tmp_path / "state.json").load_session() == "new-session"
    assert broker.registers[0][2] == [
        {"name": "m", "type": "openai", "model": "M", "status": "active", "maxConcurrency": 8}
    ]
    assert await running.stop() == 0


async def test_a_refused_token_stops_the_agent_with_status_1(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted
    broker.on_register = lambda session: error(401, "unauthorized", "Unknown token.")
    running = start()
    assert await asyncio.wait_for(running.job, 10) == 1
    assert broker.streams == []


async def test_a_dropped_stream_moves_to_the_next_broker(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted

    async def first_drops(host: str) -> httpx.Response:
        if host == "broker-a":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"")
        return await broker.stream_ok(host)

    broker.on_stream = first_drops
    running = start()
    await broker.until(lambda: "broker-b" in broker.streams)
    assert broker.streams[:2] == ["broker-a", "broker-b"]
    assert [host for host, _, _ in broker.registers[:2]] == ["broker-a", "broker-b"]
    assert [session for _, session, _ in broker.registers[:2]] == [None, "new-session"]
    assert await running.stop() == 0


async def test_tasks_it_cannot_serve_get_an_error(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted
    running = start()
    await broker.until(lambda: len(broker.streams) >= 1)
    broker.frames.put_nowait(
        {"kind": "infer", "taskId": "t1", "llmName": "nope", "endpoint": "/v1/completions"}
    )
    broker.frames.put_nowait({"kind": "cancel", "taskId": "unknown"})  # ignored
    broker.frames.put_nowait({"kind": "wake", "taskId": "t2", "llmName": "m"})  # always on
    await broker.until(lambda: len(broker.posts) >= 2)
    assert sorted(broker.posts, key=lambda post: post[0]) == [
        ("/api/v1/virtual/tasks/t1/error", {"error": "this publisher does not serve 'nope'"}),
        (
            "/api/v1/virtual/tasks/t2/result",
            {"status": 200, "body": {"status": "awake", "llmName": "m"}},
        ),
    ]
    assert await running.stop() == 0


def broken(request: httpx.Request | None = None) -> httpx.ReadError:
    """What a connection reset by the broker looks like to httpx (an empty message)."""
    return httpx.ReadError("", request=request)


def failing_first(times: int, then: int = 204) -> tuple[list[str], Callable[[str], httpx.Response]]:
    """An on_post that breaks the connection under the first ``times`` posts."""
    seen: list[str] = []

    def on_post(path: str) -> httpx.Response:
        seen.append(path)
        if len(seen) <= times:
            raise broken()
        return httpx.Response(then)

    return seen, on_post


@pytest.fixture
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "FINAL_RETRY_PAUSES", (0.0, 0.0, 0.0))


@pytest.mark.usefixtures("no_pauses")
async def test_a_last_answer_is_sent_again_when_the_connection_breaks() -> None:
    broker = ScriptedBroker()
    client = BrokerClient(["http://b"], "tok", transport=httpx.MockTransport(broker.handle))
    seen, broker.on_post = failing_first(2)
    await client.result("t1", 200, {"ok": True})
    assert seen == ["/api/v1/virtual/tasks/t1/result"] * 3
    # The batch that ends a stream is a last answer too; an error is.
    seen, broker.on_post = failing_first(1)
    await client.chunks("t2", [{"data": "a"}, {"data": "[DONE]", "done": True}])
    await client.error("t3", "boom")
    assert seen == [
        "/api/v1/virtual/tasks/t2/chunks",
        "/api/v1/virtual/tasks/t2/chunks",
        "/api/v1/virtual/tasks/t3/error",
    ]
    # A repeat of an answer that did arrive finds the task taken: 404, the task is over.
    seen, broker.on_post = failing_first(1, then=404)
    with pytest.raises(TaskGone):
        await client.result("t4", 200, {})
    assert len(seen) == 2
    # Four breaks in a row: it gives up.
    seen, broker.on_post = failing_first(4)
    with pytest.raises(httpx.ReadError):
        await client.result("t5", 200, {})
    assert len(seen) == 4
    await client.aclose()


async def test_broker_posts_carry_the_token_and_the_json_body() -> None:
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    client = BrokerClient(["http://b:9"], "tok", transport=httpx.MockTransport(handle))
    await client.result("t1", 200, {"é": 1})
    await client.aclose()
    [request] = requests
    assert str(request.url) == "http://b:9/api/v1/virtual/tasks/t1/result"
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.headers["User-Agent"].startswith("mcpd-publish/")
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"status": 200, "body": {"é": 1}}


@pytest.mark.usefixtures("no_pauses")
async def test_an_earlier_chunk_batch_is_not_sent_twice() -> None:
    broker = ScriptedBroker()
    client = BrokerClient(["http://b"], "tok", transport=httpx.MockTransport(broker.handle))
    seen, broker.on_post = failing_first(1)
    with pytest.raises(httpx.ReadError):
        await client.chunks("t1", [{"data": "a"}])
    assert seen == ["/api/v1/virtual/tasks/t1/chunks"]
    await client.aclose()


@pytest.mark.usefixtures("no_pauses")
async def test_an_answer_that_cannot_be_delivered_becomes_an_error_for_the_client(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted

    def on_post(path: str) -> httpx.Response:
        if path.endswith("/result"):
            raise broken()
        return httpx.Response(204)

    broker.on_post = on_post
    running = start()
    await broker.until(lambda: len(broker.streams) >= 1)
    broker.frames.put_nowait({"kind": "wake", "taskId": "t1", "llmName": "m"})  # always on
    await broker.until(lambda: any(path.endswith("/error") for path, _ in broker.posts))
    paths = [path for path, _ in broker.posts]
    assert paths == ["/api/v1/virtual/tasks/t1/result"] * 4 + ["/api/v1/virtual/tasks/t1/error"]
    assert "could not deliver the answer" in broker.posts[-1][1]["error"]
    assert await running.stop() == 0


async def test_keep_alive_comments_after_a_task_are_not_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        async def events() -> AsyncIterator[bytes]:
            yield b'event: ready\ndata: {"providerSessionId": "s"}\n\n'
            yield b'event: task\nid: t1\ndata: {"kind": "wake", "taskId": "t1"}\n\n'
            yield b": ping\n\n"
            yield b'event: task\nid: t2\ndata: {"kind": "wake", "taskId": "t2"}\n\n'

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    client = BrokerClient(["http://b"], "tok", transport=httpx.MockTransport(handle))
    frames: list[dict[str, Any]] = []

    async def read_all() -> None:
        async for frame in open_stream(client, "s", "sse"):
            frames.append(frame)

    with (
        caplog.at_level("WARNING", logger="mcpd.publish"),
        pytest.raises(StreamLost, match="closed the stream"),
    ):
        await read_all()
    assert [(f["type"], f.get("taskId")) for f in frames] == [
        ("ready", None),
        ("task", "t1"),
        ("task", "t2"),
    ]
    assert caplog.records == []
    await client.aclose()


class Workers:
    """Broker workers behind one mock transport: each host takes the session's heartbeat
    (200), or does not know the session (404), or refuses connections, or answers late; every
    call is logged as (host, path)."""

    def __init__(self, *hosts: str) -> None:
        self.urls = [f"http://{host}" for host in hosts]
        self.calls: list[tuple[str, str]] = []
        self.refusing: set[str] = set()
        self.strangers: set[str] = set()  # workers of a broker that does not know the session
        self.delays: dict[str, float] = {}  # seconds before a host answers

    async def handle(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if host in self.refusing:
            raise httpx.ConnectError("connection refused", request=request)
        await asyncio.sleep(self.delays.get(host, 0.0))
        self.calls.append((host, path))
        if path.endswith("/heartbeat"):
            if host in self.strangers:
                return error(404, "session_not_found", "No such session.")
            return httpx.Response(200, json={"ok": True, "llms": 1})
        return httpx.Response(204)

    def client(self) -> BrokerClient:
        return BrokerClient(self.urls, "tok", transport=httpx.MockTransport(self.handle))

    def answered(self, since: int = 0) -> dict[str, set[str]]:
        """Task id -> the hosts its answers went to, for the calls after ``since``."""
        hosts: dict[str, set[str]] = {}
        for host, path in self.calls[since:]:
            if "/tasks/" in path:
                hosts.setdefault(path.split("/")[5], set()).add(host)
        return hosts


async def answer(client: BrokerClient, count: int, tag: str) -> None:
    """``count`` tasks each answer with a chunk batch, then the batch that ends the stream."""
    for i in range(count):
        await client.chunks(f"{tag}{i}", [{"data": "a"}])
        await client.chunks(f"{tag}{i}", [{"data": "[DONE]", "done": True}])


async def test_answers_are_spread_over_the_urls_that_take_the_sessions_heartbeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="mcpd.publish")
    workers = Workers("a", "b", "c", "d", "e")
    client = workers.client()
    # Before a probe only the current URL (where the stream is) takes answers.
    await answer(client, 20, "early")
    assert {frozenset(hosts) for hosts in workers.answered().values()} == {frozenset("a")}

    # The probe heartbeats every URL: b takes it as fast as a; c belongs to a broker that does
    # not know the session; d refuses connections; e takes it, but 150 ms away. Only b joins
    # a in taking answers.
    workers.strangers.add("c")
    workers.refusing.add("d")
    workers.delays["e"] = 0.15  # another region's
    await client.probe("s1")
    heartbeat = "/api/v1/virtual/heartbeat"
    assert sorted(workers.calls[-4:]) == [
        ("a", heartbeat),
        ("b", heartbeat),
        ("c", heartbeat),
        ("e", heartbeat),
    ]
    assert client.proven == {"http://b"}
    assert caplog.messages == ["answers go to 2 of 5 broker URLs: http://a, http://b"]
    since = len(workers.calls)
    await answer(client, 40, "spread")
    answered = workers.answered(since)
    assert len(answered) == 40
    assert all(len(hosts) == 1 for hosts in answered.values())  # a task's answers stay together
    by_host = [next(iter(hosts)) for hosts in answered.values()]
    assert set(by_host) == {"a", "b"}
    assert min(by_host.count("a"), by_host.count("b")) >= 10

    # b goes down: a task that picked it moves to the other share, a (never to c, which does
    # not know the session, nor to e); b takes no more answers until a probe finds it again.
    workers.refusing.add("b")
    since = len(workers.calls)
    await answer(client, 20, "down")
    assert {host for hosts in workers.answered(since).values() for host in hosts} == {"a"}
    assert client.proven == set()
    assert client.url == "http://a"  # the stream's URL stays the current one
    assert caplog.messages[-1] == "broker http://b unreachable: it takes no answers for now"

    workers.refusing.discard("b")
    await client.probe("s1")
    assert client.proven == {"http://b"}
    since = len(workers.calls)
    await answer(client, 20, "back")
    assert {host for hosts in workers.answered(since).values() for host in hosts} == {"a", "b"}
    await client.aclose()


async def test_the_agent_probes_the_other_urls_and_spreads_its_answers(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    broker, start = scripted
    hosts: list[str] = []
    handle = broker.handle

    async def recording(request: httpx.Request) -> httpx.Response:
        if "/tasks/" in request.url.path:
            hosts.append(request.url.host)
        return await handle(request)

    broker.handle = recording  # type: ignore[method-assign]  # record each answer's host
    running = start(heartbeat_seconds=0.05)
    # The probe goes out as the stream opens, and again with every heartbeat.
    await broker.until(lambda: broker.heartbeats >= 3)
    for i in range(30):
        broker.frames.put_nowait({"kind": "wake", "taskId": f"t{i}", "llmName": "m"})
    await broker.until(lambda: len(hosts) >= 30)
    assert set(hosts) == {"broker-a", "broker-b"}
    assert broker.streams == ["broker-a"]
    assert await running.stop() == 0


async def test_without_the_stream_urls_heartbeat_the_fastest_url_is_the_mark() -> None:
    workers = Workers("a", "b", "c", "d")
    client = workers.client()
    workers.strangers.add("a")  # the stream's URL refuses the probe (404)
    workers.delays.update(b=0.04, c=0.06, d=0.3)
    await client.probe("s1")
    # b, the fastest, sets the mark: c is near it, d is not (2 x 40 ms + 25 ms = 105 ms).
    assert client.proven == {"http://b", "http://c"}
    await client.aclose()


async def test_evicted_rows_are_registered_again_at_the_next_heartbeat(
    scripted: tuple[ScriptedBroker, Callable[..., Running]],
) -> None:
    """Issue 28: a row an admin evicted (or gcsweep deleted) while the agent is connected is
    published again at the next heartbeat, under the same session and without reconnecting
    (it stayed gone until the next reconnect before)."""
    broker, start = scripted
    answers = iter([httpx.Response(200, json={"ok": True, "llms": 0})])
    broker.on_heartbeat = lambda: next(answers, httpx.Response(200, json={"ok": True, "llms": 1}))
    running = start(heartbeat_seconds=1.0, brokers=URLS[:1])
    await broker.until(lambda: len(broker.registers) >= 2)
    assert [session for _, session, _ in broker.registers[:2]] == [None, "new-session"]
    assert broker.registers[1][2] == [
        {"name": "m", "type": "openai", "model": "M", "status": "active", "maxConcurrency": 8}
    ]
    await broker.until(lambda: broker.heartbeats >= 3)
    assert len(broker.registers) == 2, "registered once more, not at every heartbeat"
    assert len(broker.streams) == 1, "the stream stayed open"
    assert await running.stop() == 0


async def test_a_replaced_stream_says_another_agent_holds_the_session(
    scripted: tuple[ScriptedBroker, Callable[..., Running]], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 28: two agents sharing one state file fought silently ("the broker closed the
    stream", again and again). The broker's `replaced` event is named, and the agent waits
    its longest backoff before taking the session back."""
    broker, start = scripted
    replaced = b'event: replaced\ndata: {"reason": "replaced"}\n\n'

    async def first_replaced(host: str) -> httpx.Response:
        if len(broker.streams) == 1:
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=replaced
            )
        return await broker.stream_ok(host)

    broker.on_stream = first_replaced
    with caplog.at_level("INFO", logger="mcpd.publish"):
        running = start(brokers=URLS[:1])
        await broker.until(lambda: len(broker.streams) >= 2)
        await broker.live("after")
    lines = [r.getMessage() for r in caplog.records if "replaced stream" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "another agent holds this session (replaced stream)" in lines[0]
    assert "taking the session back in" in lines[0]
    assert [session for _, session, _ in broker.registers[:2]] == [None, "new-session"]
    assert await running.stop() == 0


def test_a_socket_closed_4409_is_a_replaced_stream() -> None:
    from virtual_llms.publisher.control import Replaced, _raise_for_close

    with pytest.raises(Replaced, match="another agent holds this session"):
        _raise_for_close(4409, "replaced by a newer stream for this session", "")

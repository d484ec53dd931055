"""End to end: the openai SDK → mcpd (three daphne workers on PostgreSQL + Redis) →
``mcpd-publish`` (a real subprocess) → a fake OpenAI-compatible upstream that records what
it saw (tests/test_publisher_upstream.py).

Agents connect to the first broker URL they are given, so the tests know which worker holds
each stream; clients call another worker, so every task crosses workers (over SSE the agent
spreads its answer POSTs over all three).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.cluster import ROOT, Broker, free_port
from tests.test_publisher_upstream import FakeUpstream, prompt_of

pytestmark = pytest.mark.multiproc

TAG = uuid.uuid4().hex[:6]
WAIT = 20.0  # seconds: the bound of every wait below


# --- helpers ---------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, top: dict[str, Any], llms: list[dict[str, Any]]) -> Path:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for llm in llms:
        lines += ["", "[[llm]]"] + [f"{key} = {toml_value(value)}" for key, value in llm.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(what: Callable[[], bool], why: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {why}")
        time.sleep(0.05)


@dataclass
class Agent:
    """A running ``python -m virtual_llms.publisher``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    config: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = WAIT) -> None:
        try:
            wait_until(lambda: self.log().count(text) >= count, repr(text), timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log()}") from None

    def stop(self, timeout: float = WAIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the agent ignored SIGTERM\n{self.log()}") from None


def start_agent(
    tmp: Path,
    token: str,
    brokers: list[str],
    llms: list[dict[str, Any]],
    *,
    transport: str = "sse",
    name: str = "agent",
    settings: dict[str, Any] | None = None,
) -> Agent:
    """``settings``: more top-level keys of the agent's config (``heartbeat_seconds``...)."""
    config = write_config(
        tmp / f"{name}.toml",
        {
            "broker": brokers,
            "transport": transport,
            "state_file": f"{name}.state.json",
            "shutdown_grace_seconds": 10,  # a stop always ends within WAIT
            **(settings or {}),
        },
        llms,
    )
    log_path = tmp / f"{name}.log"
    connected = f"connected to {brokers[0]}"
    earlier = log_path.read_text().count(connected) if log_path.exists() else 0  # a restart
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtual_llms.publisher", "--config", str(config), "-v"],
            cwd=ROOT,
            env={**os.environ, "MCPD_PUBLISHER_TOKEN": token, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    agent = Agent(proc, log_path, config)
    agent.wait_log(connected, earlier + 1)
    return agent


def client(broker: Broker, i: int = 1) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{broker.url(i)}/v1",
        api_key=broker.token("client"),
        max_retries=0,
        timeout=WAIT,
    )


def row(broker: Broker, name: str) -> dict[str, Any]:
    response = httpx.get(
        f"{broker.url(1)}/api/v1/llms/{name}",
        headers={"Authorization": f"Bearer {broker.token('client')}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def ask(chat: openai.OpenAI, model: str, text: str) -> str:
    answer = chat.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return answer.choices[0].message.content or ""


def ask_stream(chat: openai.OpenAI, model: str, text: str) -> list[str | None]:
    stream = chat.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True
    )
    with stream:
        return [chunk.choices[0].delta.content for chunk in stream if chunk.choices]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def publisher_token(broker3: Broker) -> str:
    return broker3.new_token("publisher", f"e2e-{TAG}")


@dataclass
class Published:
    agent: Agent
    name: str  # an LLM served by the fake upstream
    down: str  # an LLM whose upstream is down
    transport: str


@pytest.fixture(scope="module", params=["sse", "ws"])
def published(
    request: pytest.FixtureRequest,
    broker3: Broker,
    upstream: FakeUpstream,
    publisher_token: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Published]:
    transport = request.param
    name, down = f"e2e-{TAG}-{transport}", f"e2e-{TAG}-{transport}-down"
    agent = start_agent(
        tmp_path_factory.mktemp(f"agent-{transport}"),
        publisher_token,
        [broker3.url(0), broker3.url(1), broker3.url(2)],
        [
            {"name": name, "model": "fake-model", "upstream": upstream.url, "api_key": "up-key"},
            {"name": down, "model": "fake-model", "upstream": closed_port_url()},
        ],
        transport=transport,
        name=f"agent-{transport}",
    )
    yield Published(agent, name, down, transport)
    assert agent.stop() == 0


# --- serving ---------------------------------------------------------------------------------


def test_non_streaming_answers_arrive_intact(
    broker3: Broker, upstream: FakeUpstream, published: Published
) -> None:
    chat = client(broker3)
    prompt = f"hello {published.name} ünïcode"
    assert ask(chat, published.name, prompt) == f"echo: {prompt}"
    seen = next(s for s in upstream.seen if prompt_of(s.body) == prompt)
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "fake-model"  # the row's model, set by the broker
    assert seen.authorization == "Bearer up-key"

    embedded = chat.embeddings.create(model=published.name, input=["a", "b", "c"])
    assert [item.embedding for item in embedded.data] == [[float(i), 0.5, -1.0] for i in range(3)]


def test_streaming_answers_arrive_intact(broker3: Broker, published: Published) -> None:
    words = ask_stream(client(broker3), published.name, f"slow:40:0.01:{published.name}")
    assert words == [f"w{i} " for i in range(40)] + [None]


def task_posts(broker: Broker) -> list[int]:
    """The task answers (POSTs) each worker has taken, from daphne's access logs."""
    return [broker.log(i, tail=None).count('"POST /api/v1/virtual/tasks/') for i in range(3)]


def test_answers_over_http_are_spread_over_the_workers(
    broker3: Broker, published: Published
) -> None:
    # The agent's probes: the session's heartbeat, sent to the workers not holding its stream.
    wait_until(
        lambda: all('"POST /api/v1/virtual/heartbeat' in broker3.log(i, None) for i in (1, 2)),
        "the agent's heartbeat at workers 1 and 2",
    )
    published.agent.wait_log("answers go to 3 of 3 broker URLs")
    before = task_posts(broker3)
    chat = client(broker3)
    for i in range(45):
        assert ask(chat, published.name, f"spread {i}") == f"echo: spread {i}"
    if published.transport == "sse":
        # At least: a POST of the test before may be logged a moment after its client's answer.
        wait_until(lambda: sum(task_posts(broker3)) - sum(before) >= 45, "45 answer POSTs")
        added = [now - then for now, then in zip(task_posts(broker3), before, strict=True)]
        assert min(added) >= 5, added  # each worker took a share (a third is 15)
    else:
        assert task_posts(broker3) == before  # over WebSocket the answers come on the socket


def test_upstream_refusal_keeps_its_status(broker3: Broker, published: Published) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client(broker3), published.name, "fail:400")
    assert refused.value.status_code == 400
    assert "upstream says 400" in str(refused.value)


def test_client_leaving_mid_stream_cancels_the_upstream(
    broker3: Broker, upstream: FakeUpstream, published: Published
) -> None:
    prompt = f"slow:400:0.05:leave-{published.name}"
    stream = client(broker3).chat.completions.create(
        model=published.name, messages=[{"role": "user", "content": prompt}], stream=True
    )
    with stream:
        for seen, _ in enumerate(stream):
            if seen == 3:
                break
    upstream.wait_for(lambda: prompt in upstream.hangups, WAIT)
    assert prompt not in upstream.completed


def test_down_upstream_is_a_502_with_the_agents_message(
    broker3: Broker, published: Published
) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        ask(client(broker3), published.down, "anyone there?")
    assert failed.value.status_code == 502
    assert "unreachable" in str(failed.value)
    assert published.down in str(failed.value)


# --- failover, shutdown, restart -------------------------------------------------------------


def test_worker_holding_the_stream_dies_agent_moves_on(
    broker3: Broker, upstream: FakeUpstream, publisher_token: str, tmp_path: Path
) -> None:
    name = f"e2e-{TAG}-failover"
    urls = [broker3.url(2), broker3.url(0), broker3.url(1)]
    llm = {"name": name, "model": "fake-model", "upstream": upstream.url}
    agent = start_agent(tmp_path, publisher_token, urls, [llm])
    try:
        chat = client(broker3, 1)
        assert ask(chat, name, "before") == "echo: before"
        session = row(broker3, name)["providerSessionId"]
        broker3.kill(2)
        try:
            agent.wait_log(f"connected to {broker3.url(0)}")
            assert ask(chat, name, "after") == "echo: after"
            assert row(broker3, name)["providerSessionId"] == session
            assert "as the same session" in agent.log()
        finally:
            broker3.start_worker(2)
    finally:
        assert agent.stop() == 0


def test_sigterm_finishes_tasks_in_flight_and_restart_keeps_the_session(
    broker3: Broker, upstream: FakeUpstream, publisher_token: str, tmp_path: Path
) -> None:
    name = f"e2e-{TAG}-restart"
    llm = {"name": name, "model": "fake-model", "upstream": upstream.url}
    urls = [broker3.url(0), broker3.url(1)]
    agent = start_agent(tmp_path, publisher_token, urls, [llm])
    before = row(broker3, name)
    prompt = f"slow:15:0.1:{name}"
    words: list[str | None] = []

    def read() -> None:
        words.extend(ask_stream(client(broker3), name, prompt))

    reader = threading.Thread(target=read)
    reader.start()
    upstream.wait_for(lambda: prompt in upstream.prompts())
    time.sleep(0.3)  # a few words are out
    assert agent.stop() == 0
    reader.join(WAIT)
    assert words == [f"w{i} " for i in range(15)] + [None]
    assert "withdrew 1 LLM(s)" in agent.log()
    assert row(broker3, name)["status"] == "inactive"

    again = start_agent(tmp_path, publisher_token, urls, [llm])
    try:
        assert f"as the same session {before['providerSessionId']}" in again.log()
        after = row(broker3, name)
        assert (after["id"], after["status"]) == (before["id"], "active")
        assert ask(client(broker3), name, "back") == "echo: back"
    finally:
        assert again.stop() == 0


# --- sleep and wake --------------------------------------------------------------------------

WAKE = """
import pathlib, sys, time
time.sleep(1.0)  # loading the model
pathlib.Path(sys.argv[1]).touch()
with open(sys.argv[2], "a") as log:
    log.write("wake\\n")
"""
SLEEP = """
import pathlib, sys
pathlib.Path(sys.argv[1]).unlink(missing_ok=True)
with open(sys.argv[2], "a") as log:
    log.write("sleep\\n")
"""
BROKEN = "import sys; print('no GPU left for', sys.argv[1]); sys.exit(3)"


def test_hibernating_llm_wakes_once_for_many_and_sleeps_when_idle(
    broker3: Broker, publisher_token: str, tmp_path: Path
) -> None:
    flag, events = tmp_path / "awake", tmp_path / "events.log"
    sleepy = FakeUpstream(awake_flag=flag).start()
    name, broken = f"e2e-{TAG}-sleepy", f"e2e-{TAG}-broken"
    llms: list[dict[str, Any]] = [
        {
            "name": name,
            "model": "fake-model",
            "upstream": sleepy.url,
            "wake_command": [sys.executable, "-c", WAKE, str(flag), str(events)],
            "ready_timeout_seconds": 15,
            "sleep_command": [sys.executable, "-c", SLEEP, str(flag), str(events)],
            "idle_seconds": 3,
        },
        {
            "name": broken,
            "model": "fake-model",
            "upstream": closed_port_url(),
            "wake_command": [sys.executable, "-c", BROKEN, broken],
        },
    ]
    agent = start_agent(tmp_path, publisher_token, [broker3.url(0), broker3.url(1)], llms)
    try:
        assert row(broker3, name)["status"] == "hibernating"

        def one(i: int) -> str:
            chat = client(broker3, i % 3)
            if i % 2:
                return "".join(w or "" for w in ask_stream(chat, name, f"stream {i}"))
            return ask(chat, name, f"plain {i}")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        assert [a.strip() for a in answers] == [
            f"echo: {'stream' if i % 2 else 'plain'} {i}" for i in range(8)
        ]
        assert events.read_text().split() == ["wake"]
        assert row(broker3, name)["status"] == "active"

        wait_until(lambda: row(broker3, name)["status"] == "hibernating", "the idle sleep")
        wait_until(lambda: events.read_text().split() == ["wake", "sleep"], "the sleep command")
        assert not flag.exists()

        assert ask(client(broker3), name, "again") == "echo: again"
        assert events.read_text().split() == ["wake", "sleep", "wake"]

        with pytest.raises(openai.APIStatusError) as failed:
            ask(client(broker3), broken, "hello")
        assert failed.value.status_code == 502
        assert f"no GPU left for {broken}" in str(failed.value)
        assert row(broker3, broken)["status"] == "hibernating"
    finally:
        assert agent.stop() == 0
        sleepy.stop()


# --- mcpd-publish check -------------------------------------------------------------------------


def run_check(config: Path, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtual_llms.publisher", "check", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "MCPD_PUBLISHER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def test_check_verifies_the_token_and_each_upstream(
    broker3: Broker, upstream: FakeUpstream, publisher_token: str, tmp_path: Path
) -> None:
    good = {"name": "checked", "model": "fake-model", "upstream": upstream.url}
    config = write_config(tmp_path / "good.toml", {"broker": broker3.url(0)}, [good])
    ok = run_check(config, publisher_token)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "publisher token accepted" in ok.stdout
    assert "serves 'fake-model'" in ok.stdout

    wrong_role = run_check(config, broker3.token("client"))
    assert wrong_role.returncode == 1
    assert "not a publisher token" in wrong_role.stdout

    # Over WebSocket, check opens the stream's socket too; the broker refuses the unknown
    # session with its close code (4404), which proves the route and the token.
    top: dict[str, Any] = {"broker": broker3.url(0), "transport": "ws"}
    config = write_config(tmp_path / "ws.toml", top, [good])
    ws = run_check(config, publisher_token)
    assert ws.returncode == 0, ws.stdout + ws.stderr
    assert f"broker {broker3.url(0)}: WebSocket stream: opens" in ws.stdout
    wrong_role = run_check(config, broker3.token("client"))
    assert f"broker {broker3.url(0)}: WebSocket stream: not a publisher token" in wrong_role.stdout
    top = {"broker": [broker3.url(0), closed_port_url().removesuffix("/v1")], "transport": "ws"}
    config = write_config(tmp_path / "ws-down.toml", top, [good])
    down_broker = run_check(config, publisher_token)
    assert down_broker.returncode == 1
    assert "WebSocket stream: cannot be opened" in down_broker.stdout

    down = {"name": "gone", "model": "m", "upstream": closed_port_url()}
    config = write_config(tmp_path / "down.toml", {"broker": broker3.url(0)}, [good, down])
    failed = run_check(config, publisher_token)
    assert failed.returncode == 1
    assert "FAIL  LLM 'gone': upstream" in failed.stdout
    assert "unreachable" in failed.stdout

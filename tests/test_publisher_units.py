"""Unit tests of the agent's parts: chunk batching, backoff, the state file, the SSE decoder,
and sleep/wake (with small Python scripts as the commands)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.test_publisher_upstream import FakeUpstream
from virtual_llms.publisher import transport
from virtual_llms.publisher.backoff import Backoff
from virtual_llms.publisher.batcher import Chunk, ChunkBatcher
from virtual_llms.publisher.config import LlmConfig, PowerConfig
from virtual_llms.publisher.logs import human
from virtual_llms.publisher.power import Power, WakeFailed
from virtual_llms.publisher.statefile import StateFile

# --- chunk batching --------------------------------------------------------------------------


class GatedSend:
    """A chunk POST that completes only when the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[Chunk]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, batch: list[Chunk]) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.set()
        await self.gate.wait()
        self.gate.clear()
        self.batches.append(batch)
        self.in_flight -= 1


async def test_chunks_that_pile_up_during_a_post_go_as_one_batch() -> None:
    send = GatedSend()
    batcher = ChunkBatcher(send)
    runner = asyncio.create_task(batcher.run())
    batcher.put("a")
    await asyncio.wait_for(send.started.wait(), 5)  # "a" is in flight alone
    for data in ("b", "c", "d"):
        batcher.put(data)
    batcher.put("[DONE]", done=True)
    while not runner.done():
        send.gate.set()
        await asyncio.sleep(0)
    await runner
    assert send.batches == [
        [{"data": "a"}],
        [{"data": "b"}, {"data": "c"}, {"data": "d"}, {"data": "[DONE]", "done": True}],
    ]
    assert send.max_in_flight == 1
    assert (batcher.posts, batcher.chunks) == (2, 5)


async def test_a_batch_is_bounded_in_bytes() -> None:
    sent: list[list[Chunk]] = []

    async def send(batch: list[Chunk]) -> None:
        sent.append(batch)

    batcher = ChunkBatcher(send, max_batch_bytes=10)
    for data in ("12345", "67890", "abc", "x" * 50, "y"):
        batcher.put(data)
    batcher.put("[DONE]", done=True)
    await asyncio.wait_for(batcher.run(), 5)
    assert [[c["data"] for c in batch] for batch in sent] == [
        ["12345", "67890"],
        ["abc"],
        ["x" * 50],  # one chunk over the bound still goes, alone
        ["y", "[DONE]"],
    ]


async def test_close_flushes_without_done_and_errors_end_the_run() -> None:
    sent: list[list[Chunk]] = []

    async def send(batch: list[Chunk]) -> None:
        sent.append(batch)

    batcher = ChunkBatcher(send)
    batcher.put("a")
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert sent == [[{"data": "a"}]]
    with pytest.raises(RuntimeError):
        batcher.put("late")

    async def broken(batch: list[Chunk]) -> None:
        raise ConnectionError("gone")

    failing = ChunkBatcher(broken)
    failing.put("a")
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(failing.run(), 5)


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap() -> None:
    backoff = Backoff(base=0.5, cap=8.0, jitter=0.5, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_backoff_without_jitter_and_bad_arguments() -> None:
    backoff = Backoff(base=1, cap=100, factor=3, jitter=0)
    assert [backoff.next_delay() for _ in range(5)] == [1, 3, 9, 27, 81]
    for _ in range(200):  # no overflow however long the outage
        assert backoff.next_delay() == 100
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2)


# --- the state file ----------------------------------------------------------------------------


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "deep" / "dir" / "session.json")
    assert state.load_session() is None
    state.save_session("abc-123")
    assert state.load_session() == "abc-123"
    assert (state.path.stat().st_mode & 0o777) == 0o600
    assert json.loads(state.path.read_text())["providerSessionId"] == "abc-123"
    state.save_session("def-456")  # replaced atomically: no temporary file left behind
    assert state.load_session() == "def-456"
    assert [p.name for p in state.path.parent.iterdir()] == ["session.json"]
    state.clear()
    assert state.load_session() is None
    state.clear()  # twice is fine


@pytest.mark.parametrize(
    "content",
    ["not json", "[1, 2]", "{}", '{"providerSessionId": 5}', '{"providerSessionId": "a b"}'],
)
def test_a_damaged_state_file_is_ignored(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "session.json"
    path.write_text(content)
    assert StateFile(path).load_session() is None
    assert "ignoring the state file" in caplog.text


def test_an_unwritable_state_file_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    StateFile(blocker / "session.json").save_session("x")  # its parent is a file
    assert "could not write the state file" in caplog.text


def test_the_agent_imports_nothing_from_django() -> None:
    """It runs on machines without the broker (a fresh interpreter: pytest loaded Django)."""
    code = (
        "import sys, virtual_llms.publisher.__main__, virtual_llms.publisher.agent, "
        "virtual_llms.publisher.check; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'rest_framework', "
        "'channels', 'daphne', 'psycopg', 'redis'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"


def test_human_durations() -> None:
    assert [human(s) for s in (0.034, 12.34, 65, 3725)] == ["0.03 s", "12.3 s", "1m05s", "1h02m"]


# --- sleep and wake ----------------------------------------------------------------------------

SCRIPT = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as a server would: clean up, exit
flag, log, action = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
with log.open("a") as out:
    out.write(action + "\\n")
if action == "wake":
    flag.touch()
elif action == "sleep":
    flag.unlink(missing_ok=True)
elif action == "serve":  # the server itself: up while this process runs
    flag.touch()
    try:
        time.sleep(60)
    finally:
        flag.unlink(missing_ok=True)
elif action == "fail":
    print("out of memory loading weights")
    sys.exit(4)
"""


class PowerRig:
    def __init__(self, tmp_path: Path) -> None:
        self.flag = tmp_path / "awake"
        self.log = tmp_path / "log"
        self.log.write_text("")
        self.upstream = FakeUpstream(awake_flag=self.flag).start()
        self.reports: list[tuple[str, str]] = []

    def command(self, action: str) -> tuple[str, ...]:
        return (sys.executable, "-c", SCRIPT, str(self.flag), str(self.log), action)

    def actions(self) -> list[str]:
        return self.log.read_text().split()

    async def report(self, name: str, status: str) -> None:
        self.reports.append((name, status))

    def power(
        self,
        http: httpx.AsyncClient,
        wake: str = "wake",
        sleep: str | None = "sleep",
        idle: float | None = None,
        ready_timeout: float = 10.0,
    ) -> Power:
        config = PowerConfig(
            wake_command=self.command(wake),
            ready_url=f"{self.upstream.url}/models",
            ready_timeout_seconds=ready_timeout,
            sleep_command=self.command(sleep) if sleep else None,
            idle_seconds=idle,
        )
        llm = LlmConfig(name="m", model="fake-model", upstream=self.upstream.url, power=config)
        return Power(llm, config, http, self.report)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[PowerRig]:
    rig = PowerRig(tmp_path)
    yield rig
    rig.upstream.stop()


async def test_wake_runs_once_then_idle_sleep(rig: PowerRig) -> None:
    async with transport.client() as http:
        power = rig.power(http, idle=0.5)
        await power.start()
        assert power.status == "hibernating"
        took = await asyncio.gather(power.wake(), power.wake(), power.wake())
        assert rig.actions() == ["wake"]  # the others found it ready
        assert sorted(took)[:2] == [0.0, 0.0]
        assert power.status == "active"
        async with power.in_use():
            await asyncio.sleep(0.8)  # busy: no sleep however long
        assert rig.actions() == ["wake"]
        for _ in range(100):
            if not power.awake and rig.actions() == ["wake", "sleep"]:
                break
            await asyncio.sleep(0.05)
        assert rig.actions() == ["wake", "sleep"]
        assert rig.reports == [("m", "hibernating")]
        async with power.in_use():  # a task that raced with the sleep wakes it by itself
            assert power.awake
        assert rig.actions() == ["wake", "sleep", "wake"]
        assert rig.reports[-1] == ("m", "active")
        await power.close()


async def test_a_failing_wake_command_says_why(rig: PowerRig) -> None:
    async with transport.client() as http:
        power = rig.power(http, wake="fail")
        with pytest.raises(WakeFailed, match=r"exit 4\): out of memory loading weights"):
            await power.wake()
        assert not power.awake
        await power.close()


async def test_a_wake_that_never_gets_ready_times_out(rig: PowerRig) -> None:
    async with transport.client() as http:
        power = rig.power(http, wake="nothing", ready_timeout=1.0)
        with pytest.raises(WakeFailed, match=r"was not ready at \S+ 1 s after its wake command"):
            await power.wake()
        await power.close()


async def test_a_wake_command_that_is_the_server_is_stopped_on_sleep(rig: PowerRig) -> None:
    async with transport.client() as http:
        power = rig.power(http, wake="serve", sleep=None, idle=0.3)
        await power.start()
        await power.wake()
        assert power.server is not None
        assert power.server.returncode is None
        for _ in range(100):
            if power.server is None:
                break
            await asyncio.sleep(0.05)
        assert power.server is None
        assert not rig.flag.exists()  # the server process got SIGTERM and cleaned up
        await power.wake()
        await power.close()  # the agent's exit stops it too
        assert not rig.flag.exists()


def test_check_finds_the_program_behind_exec_and_env_prefixes() -> None:
    """Issue 28: publisher.example.toml's `exec llama-server …` pattern checks the program,
    not `exec`; a missing program is still reported."""
    from virtual_llms.publisher.check import check_command
    from virtual_llms.publisher.config import LlmConfig

    llm = LlmConfig(name="n", model="m", upstream="http://127.0.0.1:1/v1")
    ok, message = check_command(llm, "wake_command", "exec sh -c 'sleep 1' --port 8081")
    assert ok, message
    assert "sh found" in message
    ok, message = check_command(llm, "wake_command", "FOO=1 exec nohup no-such-program-xyz -m x")
    assert not ok
    assert "'no-such-program-xyz' not found" in message


async def test_check_fails_a_model_the_upstream_does_not_list() -> None:
    """Issue 28: every request would be refused by the upstream, so check says FAIL."""
    import httpx

    from virtual_llms.publisher.check import check_upstream
    from virtual_llms.publisher.config import LlmConfig

    def models(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": [{"id": "fake/fake-7b"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(models)) as http:
        listed = LlmConfig(name="n", model="fake/fake-7b", upstream="http://up/v1")
        assert (await check_upstream(http, listed))[0]
        missing = LlmConfig(name="n", model="fake-7b", upstream="http://up/v1")
        ok, message = await check_upstream(http, missing)
    assert not ok
    assert "it lists: fake/fake-7b" in message


def test_check_says_how_the_broker_uses_each_llm() -> None:
    from virtual_llms.publisher.check import serving
    from virtual_llms.publisher.config import LlmConfig

    alone = LlmConfig(name="m", model="m", upstream="http://u/v1", max_concurrent=3)
    assert serving(alone) == (
        "LLM 'm': the broker sends it at most 3 task(s) at once; "
        "it is this publisher's alone (pool = false)"
    )
    pooled = LlmConfig(name="m", model="m", upstream="http://u/v1", pool=True)
    assert "at most 8 task(s)" in serving(pooled)
    assert "one box of a pool" in serving(pooled)
    assert "drains first" in serving(pooled)

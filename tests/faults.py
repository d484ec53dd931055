"""Faults for the restart tests (tests/test_multiproc_restarts.py, test_multiproc_pg_restart.py)
and the soak (bench/soak.py): a Redis and a PostgreSQL of their own, which they may restart
or pause without touching the shared services, and a continuous load of openai-SDK clients
that counts what each request got.

The load behaves as a load balancer in front of the workers would: a worker is taken out of
rotation before it is restarted, and a request whose connection is refused (it was never
sent) goes to the next worker.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai

from tests.cluster import Broker, free_port

if TYPE_CHECKING:
    from tests.test_publisher_e2e import Agent

THREADS = 6
STREAM_PROMPT = "slow:10:0.05"  # a streamed answer of 10 chunks over 0.5 s


class ServiceMissing(RuntimeError):
    """This machine lacks a server binary (the tests skip, the soak says so)."""


class PrivateRedis:
    """A redis-server of its own, on a free port, keeping nothing on disk: a restart
    comes back empty, as a managed Redis without persistence does."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceMissing("needs redis-server")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import redis

        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if redis.Redis(port=self.port).ping():
                    return self
            time.sleep(0.02)
        raise RuntimeError("the private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> float:
        """Stop and start again (empty); when it answers again (monotonic)."""
        self.stop()
        self.start()
        return time.monotonic()

    def pause(self, seconds: float) -> float:
        """SIGSTOP for ``seconds``, then SIGCONT; when it resumed (monotonic)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)
        return time.monotonic()


class PrivatePostgres:
    """A PostgreSQL of its own (initdb into a temporary directory, trust auth, user
    ``postgres``, no fsync), on a free port: it may be stopped and restarted while the shared
    one on 5432 serves everyone else. Run as the ``postgres`` user when this process is
    root (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            raise ServiceMissing("needs PostgreSQL's initdb")
        self.bin = Path(initdb).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mcpd-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ServiceMissing("root needs runuser to run PostgreSQL as postgres")
            self._as = [runuser, "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        )

    @property
    def url(self) -> str:
        """The server's URL, naming its maintenance database (Broker makes its own)."""
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        ctl = str(self.bin / "pg_ctl")
        self._run(
            ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o", options, *args
        )

    def start(self) -> float:
        """Start it; when it accepts connections (monotonic: pg_ctl -w waits for that)."""
        self._ctl("start")
        return time.monotonic()

    def stop(self) -> None:
        """A fast shutdown, as a restart does: sessions are ended, clients see it at once."""
        self._ctl("-m", "fast", "stop")

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Outcome:
    kind: str  # "chat" or "stream"
    started: float
    ended: float
    status: int  # 200, or the error's status
    code: str = ""  # the error's code
    retry_after: str | None = None
    detail: str = ""


@dataclass
class Load:
    """``threads`` clients (half streaming) calling the workers in ``up`` in turn until
    stopped."""

    broker: Broker
    token: str
    model: str
    threads: int = THREADS
    up: set[int] = field(default_factory=lambda: {0, 1, 2})
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.outcomes

    def _worker(self) -> int:
        with self._lock:
            self._turn += 1
            live = sorted(self.up)
            return live[self._turn % len(live)]

    def _run(self, n: int) -> None:
        while not self._stop.is_set():
            kind = "stream" if n % 2 else "chat"
            started = time.monotonic()
            for _ in range(3):  # refused connections only: the request was never sent
                try:
                    outcome = self._one(kind, self._worker(), started)
                    break
                except (httpx.ConnectError, openai.APIConnectionError) as exc:
                    # The SDK's own httpx (httpx2 in openai 3) wraps the refused connect.
                    cause = type(exc.__cause__).__name__ if exc.__cause__ else ""
                    if isinstance(exc, openai.APIConnectionError) and cause != "ConnectError":
                        detail = f"{exc!r} from {exc.__cause__!r}"
                        outcome = Outcome(kind, started, time.monotonic(), 0, detail=detail)
                        break
                    continue
            else:
                outcome = Outcome(kind, started, time.monotonic(), 0, detail="no worker took it")
            with self._lock:
                self.outcomes.append(outcome)

    def _one(self, kind: str, worker: int, started: float) -> Outcome:
        base = self.broker.url(worker)
        if kind == "chat":
            chat = openai.OpenAI(
                base_url=f"{base}/v1", api_key=self.token, max_retries=0, timeout=30.0
            )
            try:
                answer = chat.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                return Outcome(
                    kind,
                    started,
                    time.monotonic(),
                    exc.status_code,
                    str(body.get("code") or ""),
                    exc.response.headers.get("retry-after"),
                    exc.message,
                )
            finally:
                chat.close()
            ok = answer.choices[0].message.content == "echo: hi"
            return Outcome(kind, started, time.monotonic(), 200 if ok else 0, detail="wrong answer")
        return self._stream(base, started)

    def _stream(self, base: str, started: float) -> Outcome:
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": "user", "content": STREAM_PROMPT}],
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30.0
        ) as response:
            if response.status_code != 200:
                error = json.loads(response.read()).get("error", {})
                return Outcome(
                    "stream",
                    started,
                    time.monotonic(),
                    response.status_code,
                    str(error.get("code") or ""),
                    response.headers.get("retry-after"),
                    str(error.get("message", "")),
                )
            datas: list[str] = []
            try:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        datas.append(line[6:])
            except httpx.HTTPError as exc:
                return Outcome("stream", started, time.monotonic(), 0, detail=f"cut: {exc!r}")
        errors = [d for d in datas if d.startswith('{"error"')]
        if errors:
            error = json.loads(errors[-1])["error"]
            status = int(error.get("status") or 502)
            return Outcome("stream", started, time.monotonic(), status, str(error.get("code")))
        if not datas or datas[-1] != "[DONE]":
            return Outcome("stream", started, time.monotonic(), 0, detail="ended silently")
        chunks = len(datas) - 1
        ok = chunks >= 10
        return Outcome("stream", started, time.monotonic(), 200 if ok else 0, detail=f"{chunks}")


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.kind} {o.status} {o.code}".strip()
        counts[key] = counts.get(key, 0) + 1
    return counts


def wait_serving(broker: Broker, token: str, model: str, timeout: float = 20.0) -> None:
    """Until a request on every worker is answered (the agent's stream is bound)."""
    deadline = time.monotonic() + timeout
    for worker in range(broker.n):
        chat = openai.OpenAI(
            base_url=f"{broker.url(worker)}/v1", api_key=token, max_retries=0, timeout=10.0
        )
        while True:
            try:
                chat.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "ready?"}]
                )
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def probe_at(load: Load, when: float) -> list[Outcome]:
    """At ``when`` (monotonic), a chat and a streamed request on every worker, at once."""
    time.sleep(max(0.0, when - time.monotonic()))
    results: list[Outcome] = []
    threads = [
        threading.Thread(
            target=lambda k=kind, w=worker: results.append(load._one(k, w, time.monotonic()))
        )
        for worker in range(load.broker.n)
        for kind in ("chat", "stream")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def assert_outage_handled(outcomes: list[Outcome], probes: list[Outcome], why: str) -> None:
    """Every request of the load answered, or refused with a 503 (Retry-After) or 504 and a
    code: no 500, no silent stream; and every request 1.5 s after the fault ended answered."""
    for o in outcomes:
        if o.status == 200:
            continue
        assert o.status in (502, 503, 504), (why, o, summary(outcomes))
        assert o.code, (why, o)
        if o.status == 503 and o.kind == "chat":
            assert o.retry_after, (why, o)
    assert len(probes) == 6, (why, probes)
    assert all(o.status == 200 for o in probes), (why, probes)


def recovered_after(outcomes: list[Outcome], since: float) -> float:
    """Seconds from ``since`` (a fault's end, monotonic) to the end of the last request that
    was not answered: how long clients still saw the fault. Negative when the last one ended
    before; -inf when every request was answered."""
    ends = [o.ended for o in outcomes if o.status != 200]
    return max(ends) - since if ends else float("-inf")


def agent_per_transport(
    transport: str,
    broker: Broker,
    upstream_url: str,
    tmp: Path,
    prefix: str,
    settings: dict[str, object] | None = None,
) -> Iterator[tuple[Agent, str]]:
    """The fault modules' agent fixture: the real ``mcpd-publish`` on ``transport``, one LLM
    (``<prefix>-<broker tag>-<transport>``) on ``upstream_url``, every worker in its broker
    list; stopped at the end."""
    from tests.test_publisher_e2e import start_agent

    name = f"{prefix}-{broker.tag}-{transport}"
    running = start_agent(
        tmp,
        broker.new_token("publisher"),
        [broker.url(i) for i in range(broker.n)],
        [{"name": name, "model": "fake-model", "upstream": upstream_url}],
        transport=transport,
        name=f"agent-{transport}",
        settings=settings,
    )
    try:
        yield running, name
    finally:
        running.stop()

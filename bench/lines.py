"""Publisher lines: who answers the broker's tasks in a relayed measurement.

- ``bench``: :mod:`bench.publisher`, the minimal in-harness publisher (always there).
- ``agent``: the real publisher agent, ``mcpd-publish`` (``virtual_llms/publisher``), run
  as its own process from a command template. It is used when ``python -m
  virtual_llms.publisher --help`` runs. The template's placeholders: ``{python}``,
  ``{broker}`` (the stream worker's base URL), ``{broker_flags}`` (``--broker URL`` per
  worker, as separate arguments), ``{workers}`` (all, comma-separated), ``{token}`` (also in
  ``MCPD_PUBLISHER_TOKEN``), ``{transport}`` (``sse``/``ws``), ``{name}``, ``{model}``,
  ``{upstream}`` (``http://host:port/v1``), ``{state_file}`` and ``{llm_spec}`` (the
  agent's ``--llm`` value, with wake and sleep hooks for the wake scenario). Override it with
  ``--agent-cmd`` or ``MCPD_BENCH_AGENT_CMD``.

A line brings up one session publishing one LLM and keeps it until :meth:`stop`. The broker
metrics that do not depend on the publisher (idle-session and waiting-request memory) use
the bench line only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from .http import JSON, session
from .rpc import Child, open_log

# The agent's CLI (virtual_llms/publisher/__main__.py); the token goes in its environment
# (MCPD_PUBLISHER_TOKEN). max_concurrent is raised so the agent's own limit (default 8) does
# not cap what the broker is asked to relay.
DEFAULT_AGENT_CMD = (
    "{python} -m virtual_llms.publisher run {broker_flags} --transport {transport} "
    "--state-file {state_file} --llm {llm_spec}"
)
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WakeSpec:
    """Publish the LLM hibernating; a wake takes ``delay_s``."""

    delay_s: float


class Line(Protocol):
    name: str

    async def start(
        self,
        *,
        workers: list[str],
        stream_worker: int,
        publisher_token: str,
        client_token: str,
        transport: str,
        llm: str,
        upstream: str,
        wake: WakeSpec | None = None,
    ) -> None: ...

    async def stop(self) -> None: ...

    def pids(self) -> list[int]: ...

    async def wake_stats(self) -> tuple[int, float]:
        """(wakes handled so far, monotonic time of the last wake confirmation)."""
        ...

    async def rehibernate(self) -> None:
        """Put the LLM back to sleep before the next wake window."""
        ...


class BenchLine:
    """The in-harness publisher, one process per line instance."""

    name = "bench"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.child: Child | None = None
        self.llm = ""

    async def start(
        self,
        *,
        workers: list[str],
        stream_worker: int,
        publisher_token: str,
        client_token: str,
        transport: str,
        llm: str,
        upstream: str,
        wake: WakeSpec | None = None,
        hold: bool = False,
    ) -> None:
        self.llm = llm
        self.child = await Child.spawn(f"publisher-{llm}", "bench.publisher", self.log_dir)
        await self.child.call(
            "start",
            workers=workers,
            stream_worker=stream_worker,
            token=publisher_token,
            transport=transport,
            upstream=upstream,
            names=[llm],
            status="hibernating" if wake else "active",
            wake_delay=wake.delay_s if wake else 0.0,
            hold=hold,
            rpc_timeout=120,
        )

    async def call(self, cmd: str, **params: Any) -> Any:
        assert self.child is not None
        return await self.child.call(cmd, **params)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.close()
            self.child = None

    def pids(self) -> list[int]:
        return [self.child.pid] if self.child is not None else []

    async def wake_stats(self) -> tuple[int, float]:
        stats = await self.call("stats")
        confirmed = stats["wake_confirmed_at"]
        return int(stats["counts"].get("frame_wake", 0)), confirmed[-1] if confirmed else 0.0

    async def rehibernate(self) -> None:
        status = await self.call("set_status", name=self.llm, status="hibernating")
        if status != 200:
            raise RuntimeError(f"could not set {self.llm} hibernating: {status}")


def agent_available() -> tuple[bool, str]:
    """Whether the agent can be run: its module imports and answers ``--help``."""
    if importlib.util.find_spec("virtual_llms.publisher.__main__") is None:
        return False, "virtual_llms/publisher/__main__.py does not exist"
    try:
        subprocess.run(
            [sys.executable, "-m", "virtual_llms.publisher", "--help"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return False, f"`python -m virtual_llms.publisher --help` failed: {exc}"
    return True, ""


class AgentLine:
    """The ``mcpd-publish`` agent, started from a command template.

    For the wake scenario its LLM gets power hooks against the upstream's pretend power
    switch: ``wake_command`` sleeps ``delay_s`` then switches it on, ``ready_url`` answers
    once it is on, and after 1 s idle ``sleep_command`` switches it off (the agent then
    reports hibernating). A wake's confirmation time is the upstream's first ``ready``
    answer after switching on (the agent answers the wake task right after it)."""

    name = "agent"

    def __init__(self, log_dir: Path, template: str | None = None) -> None:
        self.log_dir = log_dir
        self.template = template or os.environ.get("MCPD_BENCH_AGENT_CMD") or DEFAULT_AGENT_CMD
        self.proc: asyncio.subprocess.Process | None = None
        self.llm = ""
        self.upstream = ""
        self.client_token = ""
        self.base = ""

    def _power_url(self) -> str:
        return f"{self.upstream.removesuffix('/v1')}/power/{self.llm}"

    def _llm_spec(self, upstream: str, wake: WakeSpec | None) -> str:
        spec = f"name={self.llm},model=bench-upstream,upstream={upstream},max_concurrent=4096"
        if wake is None:
            return spec
        power = self._power_url()
        get = sys.executable + " -c \"import urllib.request as u; u.urlopen('{}')\""
        return (
            f"{spec},wake_command=sleep {wake.delay_s:g}; {get.format(power + '/on')}"
            f",sleep_command={get.format(power + '/off')},ready_url={power}/ready"
            ",idle_seconds=1,ready_timeout_seconds=60"
        )

    async def start(
        self,
        *,
        workers: list[str],
        stream_worker: int,
        publisher_token: str,
        client_token: str,
        transport: str,
        llm: str,
        upstream: str,
        wake: WakeSpec | None = None,
    ) -> None:
        self.llm, self.upstream, self.client_token = llm, upstream, client_token
        self.base = workers[0]
        values = {
            "python": sys.executable,
            "broker": workers[stream_worker % len(workers)],
            "workers": ",".join(workers),
            "token": publisher_token,
            "transport": transport,
            "name": llm,
            "model": "bench-upstream",
            "upstream": upstream,
            "state_file": str(self.log_dir / f"agent-{llm}.state.json"),
            "llm_spec": self._llm_spec(upstream, wake),
        }
        argv: list[str] = []
        for part in shlex.split(self.template):
            if part == "{broker_flags}":
                for url in workers:
                    argv += ["--broker", url]
            else:
                argv.append(part.format(**values))
        env = {**os.environ, "MCPD_PUBLISHER_TOKEN": publisher_token}
        with open_log(self.log_dir / f"agent-{llm}.log") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if wake is None:
            await self._wait_answering()
        else:
            await self._wait_status("hibernating")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(
                f"the agent exited ({self.proc.returncode}); see {self.log_dir}/agent-*.log"
            )

    async def _wait_answering(self) -> None:
        """Ready when a relayed request through the agent answers 200."""
        body = json.dumps({"model": self.llm, "messages": [{"role": "user", "content": "hi"}]})
        headers = {"Authorization": f"Bearer {self.client_token}", **JSON}
        url = f"{self.base}/v1/chat/completions"
        last = ""
        async with session() as http:
            for _ in range(150):
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(url, data=body.encode(), headers=headers) as response:
                        answer = await response.read()
                    if response.status == 200:
                        return
                    last = f"{response.status} {answer[:200]!r}"
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the agent's LLM {self.llm} never answered: {last}")

    async def _wait_status(self, status: str, limit: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {self.client_token}"}
        url = f"{self.base}/api/v1/llms/{self.llm}"
        last = ""
        async with session() as http:
            for _ in range(int(limit / 0.2)):
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url, headers=headers) as response:
                        answer = await response.read()
                    last = f"{response.status} {answer[:200]!r}"
                    if response.status == 200 and json.loads(answer)["status"] == status:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.llm} never became {status}: {last}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    async def wake_stats(self) -> tuple[int, float]:
        async with session() as http, http.get(self._power_url() + "/stats") as response:
            stats = json.loads(await response.read())
        return int(stats["wakes"]), float(stats["ready_at"] or 0.0)

    async def rehibernate(self) -> None:
        await self._wait_status("hibernating")

"""Sleep and wake of one LLM's server: the wake command, the readiness poll, the idle timer
and the sleep command.

The wake command may start the server and exit (``systemctl start vllm``, ``docker start
...``), or be the server itself and keep running (``llama-server -m ...``). In the second
case the agent keeps the process: sleeping stops it (after the sleep command, if any), and
so does the agent's exit. Commands run in their own process group, so a Ctrl-C aimed at
the agent does not reach them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from .config import Command, LlmConfig, PowerConfig
from .logs import human, log
from .upstream import upstream_headers

POLL_SECONDS = 0.5  # between readiness probes while waking
SLEEP_COMMAND_TIMEOUT = 300.0  # a sleep command that runs longer than this is killed
STOP_GRACE_SECONDS = 10.0  # SIGTERM, then this long, then SIGKILL
OUTPUT_LINES = 20  # of a command's output, kept for the error message


class WakeFailed(Exception):
    """The model could not be woken; the message says why (sent to the waiting clients)."""


class Process:
    """A command in its own process group, its output drained into a short tail."""

    def __init__(self, command: Command, proc: asyncio.subprocess.Process, what: str) -> None:
        self.command = command
        self.proc = proc
        self.what = what
        self.tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._drain = asyncio.create_task(self._read_output())

    @classmethod
    async def start(cls, command: Command, what: str) -> Process:
        if isinstance(command, str):
            proc = await asyncio.create_subprocess_shell(
                command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        else:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(command, proc, what)

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            log.debug("%s: %s", self.what, text)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def output(self) -> str:
        return " | ".join(line for line in self.tail if line.strip())[-1000:]

    def failure(self) -> str:
        code = self.proc.returncode
        reason = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        output = self.output()
        return f"{self.what} failed ({reason})" + (f": {output}" if output else "")

    async def wait(self, timeout: float | None = None) -> int:
        await asyncio.wait_for(self.proc.wait(), timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain, 1.0)
        return self.proc.returncode if self.proc.returncode is not None else -1

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if it lingers."""
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await self.wait(STOP_GRACE_SECONDS)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await self.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


StatusReporter = Callable[[str, str], Awaitable[None]]


class Power:
    """The sleep/wake state of one LLM. ``awake`` is what the agent believes; every change
    goes through one lock, so a wake and a sleep never overlap."""

    def __init__(
        self,
        llm: LlmConfig,
        config: PowerConfig,
        http: httpx.AsyncClient,
        report: StatusReporter,
    ) -> None:
        self.llm = llm
        self.config = config
        self.http = http
        self.report = report  # (llm name, "active" | "hibernating") to the broker
        self.awake = False
        self.busy = 0  # tasks queued or running for this LLM
        self.last_used = time.monotonic()
        self.server: Process | None = None  # a wake command that is the server itself
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._idle_task: asyncio.Task[None] | None = None

    @property
    def status(self) -> str:
        """What to register: hibernating unless the model is known to be up."""
        return "active" if self.awake else "hibernating"

    async def start(self) -> None:
        """Find out whether the model is up already, then watch for idleness."""
        self.awake = await self.ready()
        self.last_used = time.monotonic()
        log.info("%s is %s", self.llm.name, "up" if self.awake else "asleep (wakes on demand)")
        if self.config.idle_seconds is not None:
            self._idle_task = asyncio.create_task(self._idle_loop(self.config.idle_seconds))

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        if self.server is not None:
            log.info("stopping the server process of %s", self.llm.name)
            await self.server.stop()
            self.server = None

    async def ready(self) -> bool:
        try:
            response = await self.http.get(
                self.config.ready_url, headers=upstream_headers(self.llm), timeout=5.0
            )
        except httpx.HTTPError:
            return False
        return response.is_success

    # --- use ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def in_use(self) -> AsyncIterator[None]:
        """Around a task: holds off the idle sleep, wakes the model if it sleeps (a task that
        raced with a sleep), and restarts the idle clock at the end."""
        self.busy += 1
        self._changed.set()
        try:
            if not self.awake:
                await self.wake(reason="a task arrived while it slept")
                await self.report(self.llm.name, "active")
            yield
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()
            self._changed.set()

    # --- wake ----------------------------------------------------------------------------------

    async def wake(self, reason: str = "the broker asked") -> float:
        """Make the model ready; returns the seconds it took. Raises WakeFailed."""
        async with self._lock:
            started = time.monotonic()
            if await self.ready():
                self._set_awake(True)
                return 0.0
            log.info("waking %s (%s)", self.llm.name, reason)
            try:
                await self._run_wake()
            except WakeFailed as exc:
                took = time.monotonic() - started
                log.error("wake of %s failed after %s: %s", self.llm.name, human(took), exc)
                raise
            took = time.monotonic() - started
            self._set_awake(True)
            log.info("woke %s in %s", self.llm.name, human(took))
            return took

    async def _run_wake(self) -> None:
        config = self.config
        if self.server is not None:  # a server we started that stopped answering
            await self.server.stop()
            self.server = None
        try:
            process = await Process.start(config.wake_command, f"wake command of {self.llm.name}")
        except OSError as exc:
            raise WakeFailed(f"wake command of {self.llm.name} could not start: {exc}") from None
        deadline = time.monotonic() + config.ready_timeout_seconds
        try:
            while True:
                code = process.returncode
                if code is not None and code != 0:
                    await process.wait()
                    raise WakeFailed(process.failure())
                if await self.ready():
                    break
                if time.monotonic() >= deadline:
                    output = process.output()
                    raise WakeFailed(
                        f"{self.llm.name} was not ready at {config.ready_url} "
                        f"{config.ready_timeout_seconds:g} s after its wake command"
                        + (f"; its output: {output}" if output else "")
                    )
                await asyncio.sleep(POLL_SECONDS)
        except BaseException:
            await process.stop()
            raise
        if process.returncode is None:
            self.server = process  # the wake command is the server: keep it
        else:
            await process.wait()

    def _set_awake(self, awake: bool) -> None:
        self.awake = awake
        self.last_used = time.monotonic()
        self._changed.set()

    # --- sleep -------------------------------------------------------------------------------

    def _idle_for(self) -> float:
        return time.monotonic() - self.last_used

    async def _idle_loop(self, idle_seconds: float) -> None:
        while True:
            self._changed.clear()
            if self.awake and not self.busy:
                remaining = idle_seconds - self._idle_for()
                if remaining <= 0:
                    try:
                        await self.sleep(idle_seconds)
                    except Exception:
                        log.exception("sleeping %s failed", self.llm.name)
                        self.last_used = time.monotonic()  # try again after another idle spell
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            else:
                await self._changed.wait()

    async def sleep(self, idle_seconds: float) -> None:
        """Tell the broker first (new requests then wake it, after this), then sleep."""
        async with self._lock:
            if not self.awake or self.busy or self._idle_for() < idle_seconds:
                return  # a task came in meanwhile
            started = time.monotonic()
            log.info("%s idle for %s: putting it to sleep", self.llm.name, human(self._idle_for()))
            await self.report(self.llm.name, "hibernating")
            if self.busy:  # a task dispatched before the broker saw the change
                await self.report(self.llm.name, "active")
                return
            self.awake = False
            await self._run_sleep()
            log.info("%s is asleep (took %s)", self.llm.name, human(time.monotonic() - started))

    async def _run_sleep(self) -> None:
        command = self.config.sleep_command
        if command is not None:
            process = await Process.start(command, f"sleep command of {self.llm.name}")
            try:
                code = await process.wait(SLEEP_COMMAND_TIMEOUT)
            except TimeoutError:
                await process.stop()
                code = -1
            if code != 0:
                log.error("%s", process.failure())
        if self.server is not None:
            await self.server.stop()
            self.server = None

"""The agent: register, hold the control stream, heartbeat, run tasks, reconnect, drain.

Life of the agent (PROTOCOL.md "Publisher API")::

    register (sticky session id from the state file)
      → open the control stream → heartbeat every 30 s, run each task it sends
      → the stream drops: back off (exponential, jittered), next broker URL, register again
    SIGTERM → withdraw the LLMs (new requests get 503 at once), let tasks in flight finish
      (or fail them after the grace period), close the stream, exit 0.

Tasks outlive the stream they came on: each is an asyncio task of its own that posts its
answer to whichever broker URL answers. A task the broker forgot (its client left, the stream
dropped) answers 404 to the next post, and the task stops at once. Over a WebSocket, infer
tasks answer on the socket instead (one frame instead of one HTTP request); the broker's
``protocol_error`` naming a task stops it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import transport
from .backoff import Backoff
from .broker import BrokerClient, BrokerError, TaskGone
from .config import Config, LlmConfig
from .control import Frame, Redirected, Replaced, StreamLost, StreamRefused, Uplink, open_stream
from .logs import human, log
from .power import Power, WakeFailed
from .sink import TaskSink
from .statefile import StateFile
from .upstream import forward

# A stream that stayed up this long was healthy: the next drop starts the backoff afresh.
STABLE_SECONDS = 10.0
# After the grace period, failed tasks get this long to post their error.
FAIL_POST_SECONDS = 5.0
SHUTTING_DOWN = "the publisher is shutting down"


class Fatal(Exception):
    """Retrying cannot help (the token is refused, the broker rejects the configuration)."""


class SessionLost(Exception):
    """The broker no longer knows the session (heartbeat 404)."""


@dataclass
class Served:
    """One published LLM at run time."""

    config: LlmConfig
    power: Power | None
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.config.max_concurrent)

    @property
    def name(self) -> str:
        return self.config.name

    def provider(self) -> dict[str, Any]:
        """This LLM in a register call."""
        entry: dict[str, Any] = {
            "name": self.config.name,
            "type": self.config.type,
            "model": self.config.model,
            "status": self.power.status if self.power is not None else "active",
            # The broker sends no more than this at once; more wait in its queue (v1.1).
            "maxConcurrency": self.config.max_concurrent,
        }
        if self.config.pool:
            entry["pool"] = True
        if self.config.tier is not None:
            entry["tier"] = self.config.tier
        if self.config.description is not None:
            entry["description"] = self.config.description
        return entry

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Around one infer task: awake (see Power.in_use), and one of max_concurrent slots."""
        async with contextlib.AsyncExitStack() as stack:
            if self.power is not None:
                await stack.enter_async_context(self.power.in_use())
            await stack.enter_async_context(self.slots)
            yield


@dataclass
class Running:
    task_id: str
    kind: str
    llm_name: str
    job: asyncio.Task[None] | None = None
    shutdown: bool = False  # cancelled by our own shutdown, not by the broker
    refused: str | None = None  # cancelled because the broker refused an answer on the socket


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        broker: BrokerClient | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.broker = broker or BrokerClient(config.brokers, config.token)
        total = sum(llm.max_concurrent for llm in config.llms)
        self.upstream = transport.client(max_connections=total + 16)
        self.served = {
            llm.name: Served(
                llm,
                Power(llm, llm.power, self.upstream, self.report_status) if llm.power else None,
            )
            for llm in config.llms
        }
        self.state = StateFile(config.state_file)
        self.session_id = self.state.load_session()
        self.tasks: dict[str, Running] = {}
        # Over a WebSocket, infer tasks answer on the socket while it is open.
        self.uplink = Uplink(self._on_refused) if config.transport == "ws" else None
        self.backoff = backoff or Backoff()
        self.connected = False
        self.stream_url: str | None = None  # where the current stream is (or was) held
        self.ready_at: float | None = None  # when it said "ready"
        self.draining = False
        self.stopping = asyncio.Event()
        self._abort = asyncio.Event()  # a second signal: stop waiting for tasks
        self._task_ended = asyncio.Event()

    # --- the main loop ------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit status 0) or a fatal refusal (1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            for served in self.served.values():
                if served.power is not None:
                    await served.power.start()
            return await self._loop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.aclose()

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info(
                "%s: stopping; %d task(s) in flight get up to %s",
                why,
                len(self.tasks),
                human(self.config.shutdown_grace_seconds),
            )
            self.stopping.set()
        else:
            log.info("%s again: failing the tasks in flight now", why)
            self._abort.set()
            self._task_ended.set()

    async def _loop(self) -> int:
        while not self.stopping.is_set():
            self.stream_url = None
            self.ready_at = None
            try:
                await self._register()
                self.stream_url = self.broker.url
                await self._serve()
            except Fatal as exc:
                log.error("giving up: %s", exc)
                await self._drain()
                return 1
            except Redirected as exc:  # a draining worker: straight to the next URL
                log.info("%s; reconnecting now", exc)
                self.broker.rotate(self.stream_url or self.broker.url)
                continue
            except Replaced as exc:  # another agent: say so, and do not fight it
                delay = self.backoff.cap
                log.error("%s; taking the session back in %s", exc, human(delay))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                continue
            except (BrokerError, httpx.HTTPError, StreamLost, StreamRefused, SessionLost) as exc:
                self._on_drop(exc)
            except Exception:
                log.exception("unexpected error; starting over")
            if self.stopping.is_set():
                break
            delay = self.backoff.next_delay()
            log.info("reconnecting in %s (to %s)", human(delay), self.broker.url)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
        await self._drain()
        return 0

    def _on_drop(self, exc: Exception) -> None:
        """Log why the connection ended, in one line; move on to the next broker URL."""
        if isinstance(exc, httpx.HTTPError):
            reason = f"broker unreachable: {exc or type(exc).__name__}"
        elif isinstance(exc, StreamRefused):
            reason = f"the broker refused the stream of session {self.session_id}: {exc}"
        else:
            reason = str(exc)
        url = self.stream_url or self.broker.url
        if self.ready_at is not None:
            lasted = time.monotonic() - self.ready_at
            if lasted >= STABLE_SECONDS:
                self.backoff.reset()
            log.error("stream to %s lost after %s: %s", url, human(lasted), reason)
        elif self.stream_url is not None:
            log.error("cannot open the control stream at %s: %s", url, reason)
        else:
            log.error("cannot register at %s: %s", url, reason)
        self.broker.rotate(url)

    async def _register(self) -> None:
        """Register every LLM under the stored session (sticky) or a new one."""
        started = time.monotonic()
        providers = [served.provider() for served in self.served.values()]
        previous = self.session_id
        try:
            session_id, _ = await self.broker.register(previous, providers)
        except BrokerError as exc:
            if exc.status == 403 and previous is not None:
                log.warning(
                    "session %s belongs to another publisher token; starting a new one", previous
                )
                self.session_id = None
                self.state.clear()
                return await self._register()
            if exc.status in (400, 401, 403):
                raise Fatal(f"the broker refused the registration: {exc}") from None
            raise
        self.session_id = session_id
        if session_id != previous:
            self.state.save_session(session_id)
        statuses = ", ".join(f"{p['name']} ({p['status']})" for p in providers)
        log.info(
            "registered %s as %s session %s at %s in %s",
            statuses,
            "the same" if session_id == previous else "new",
            session_id,
            self.broker.url,
            human(time.monotonic() - started),
        )

    async def _serve(self) -> None:
        """Hold one control stream until it ends (raises why) or a stop is requested (drains
        the tasks in flight first, with the stream still open)."""
        assert self.session_id is not None
        reader = asyncio.create_task(self._read_stream(self.session_id))
        heart = asyncio.create_task(self._heartbeat_loop(self.session_id))
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({reader, heart, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                heart.cancel()  # a heartbeat would make the withdrawn rows active again
                await self._drain()
                return
            if heart.done():
                heart.result()  # raises SessionLost
            reader.result()  # raises why the stream ended
        finally:
            self.connected = False
            for job in (reader, heart, stop):
                job.cancel()
            await asyncio.gather(reader, heart, stop, return_exceptions=True)

    async def _read_stream(self, session_id: str) -> None:
        started = time.monotonic()
        url = self.broker.url
        async with contextlib.aclosing(
            open_stream(self.broker, session_id, self.config.transport, self.uplink)
        ) as frames:
            async for frame in frames:
                if frame["type"] == "ready":
                    self.connected = True
                    self.ready_at = time.monotonic()
                    log.info(
                        "connected to %s (%s) in %s",
                        url,
                        self.config.transport,
                        human(time.monotonic() - started),
                    )
                else:
                    self._on_task(frame)

    async def _heartbeat_loop(self, session_id: str) -> None:
        # With each heartbeat the other broker URLs are probed, and those that take the
        # session's heartbeat take a share of the answers (BrokerClient.probe); the first probe
        # goes now, so the share starts with the first tasks.
        await self.broker.probe(session_id)
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            probe = asyncio.create_task(self.broker.probe(session_id))
            try:
                await self._heartbeat(session_id)
                await probe
            finally:
                probe.cancel()

    async def _heartbeat(self, session_id: str) -> None:
        try:
            count = await self.broker.heartbeat(session_id)
            log.debug("heartbeat: %d LLM(s)", count)
            if count < len(self.served):
                # An admin evicted some rows (or gcsweep deleted them) while we are connected:
                # publish them again now, under the same session and with the stream kept open,
                # rather than leave them gone until the next reconnect (issue 28). A revoked
                # token never gets here: its heartbeat is refused (401) and the agent stops.
                log.warning(
                    "the broker holds %d of our %d LLM(s) (evicted?); registering them again",
                    count,
                    len(self.served),
                )
                await self._register()
                if self.session_id != session_id:  # the broker forgot the session meanwhile
                    raise SessionLost(f"the broker forgot session {session_id}")
        except BrokerError as exc:
            if exc.status == 404:
                raise SessionLost(f"the broker forgot session {session_id}") from None
            log.error("heartbeat refused: %s", exc)
        except httpx.HTTPError as exc:
            log.warning("heartbeat failed: %s", exc or type(exc).__name__)

    async def report_status(self, llm_name: str, status: str) -> None:
        """Tell the broker an LLM went to sleep or woke by itself. While disconnected the
        next registration carries the status instead."""
        if not self.connected or self.draining or self.session_id is None:
            return
        try:
            await self.broker.set_status(self.session_id, llm_name, status)
        except (BrokerError, httpx.HTTPError) as exc:
            log.error("could not tell the broker that %s is %s: %s", llm_name, status, exc)

    # --- tasks -------------------------------------------------------------------------------

    def _on_task(self, frame: Frame) -> None:
        kind = frame.get("kind")
        task_id = frame.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            log.warning("ignoring a task frame without a taskId: %.200r", frame)
            return
        if kind == "cancel":
            self._cancel(task_id)
            return
        if kind not in ("infer", "wake"):
            log.warning("ignoring a task of unknown kind %r (%s)", kind, task_id)
            return
        if task_id in self.tasks:
            return  # the same task again: it is already running
        name = str(frame.get("llmName"))
        running = Running(task_id, kind, name)
        served = self.served.get(name)
        work: Callable[[TaskSink], Awaitable[str]]
        # A pooled LLM drains: a task the broker sent as the drain began still runs (within
        # the grace period); anything else is refused once the agent shuts down.
        if self.draining and not (served is not None and served.config.pool and kind == "infer"):
            work = self._refuse(SHUTTING_DOWN)
        elif served is None:
            work = self._refuse(f"this publisher does not serve {name!r}")
        elif kind == "wake":
            work = self._wake(served)
        else:
            work = self._infer(served, frame)
        self.tasks[task_id] = running
        running.job = asyncio.create_task(self._run_task(running, work), name=f"task-{task_id}")
        log.debug(
            "task %s: %s %s%s",
            task_id,
            kind,
            name,
            f" {frame.get('endpoint')}{' (stream)' if frame.get('streaming') else ''}"
            if kind == "infer"
            else "",
        )

    def _cancel(self, task_id: str) -> None:
        running = self.tasks.get(task_id)
        if running is None or running.job is None:
            return
        if running.kind == "wake":
            log.info(
                "the broker gave up waiting for %s to wake; it keeps loading", running.llm_name
            )
            return
        log.debug("task %s: cancelled by the broker (the client left or timed out)", task_id)
        running.job.cancel()

    def _on_refused(self, task_id: str, code: str, message: str) -> None:
        """The broker did not take an answer sent on the socket. ``task_not_found``: the task
        is over (its client left, it timed out); anything else: the answer is lost, so the
        task stops and posts an error instead, and its client hears of it at once."""
        gone = code == "task_not_found"
        (log.debug if gone else log.warning)(
            "task %s: the broker refused its answer: %s", task_id, message
        )
        running = self.tasks.get(task_id)
        if running is None or running.job is None:
            return  # it has ended already
        if not gone:
            running.refused = f"the broker refused the answer: {message}"
        running.job.cancel()

    async def _run_task(self, running: Running, work: Callable[[TaskSink], Awaitable[str]]) -> None:
        uplink = self.uplink if running.kind == "infer" else None
        sink = TaskSink(self.broker, running.task_id, uplink)
        started = time.monotonic()
        tag = f"task {running.task_id} ({running.kind} {running.llm_name})"
        try:
            summary = await work(sink)
            log.debug("%s: %s; took %s", tag, summary, human(time.monotonic() - started))
        except TaskGone:
            log.debug("%s: the broker dropped it; stopped", tag)
        except asyncio.CancelledError:
            if running.shutdown:
                log.warning("%s: failed, %s", tag, SHUTTING_DOWN)
                await self._post_error(sink, tag, SHUTTING_DOWN)
            elif running.refused is not None:
                # Over HTTP: the socket's refusal may come again for an error frame.
                await self._post_error(TaskSink(self.broker, running.task_id), tag, running.refused)
            raise
        except BrokerError as exc:
            log.error("%s: the broker refused the answer: %s", tag, exc)
            await self._post_error(sink, tag, f"the broker refused the answer: {exc}")
        except httpx.HTTPError as exc:
            # Its client would wait for the broker's timeout: tell it now, if the broker hears.
            log.error("%s: could not deliver the answer to the broker: %r", tag, exc)
            await self._post_error(
                sink, tag, f"the publisher could not deliver the answer: {exc!r}"
            )
        except Exception as exc:
            log.exception("%s: failed", tag)
            await self._post_error(sink, tag, f"publisher error: {exc}")
        finally:
            self.tasks.pop(running.task_id, None)
            self._task_ended.set()

    async def _post_error(self, sink: TaskSink, tag: str, message: str) -> None:
        try:
            await asyncio.wait_for(sink.error(message), FAIL_POST_SECONDS)
        except (TaskGone, BrokerError, httpx.HTTPError, TimeoutError) as exc:
            log.debug("%s: could not post its error: %s", tag, exc)

    def _refuse(self, message: str) -> Callable[[TaskSink], Awaitable[str]]:
        async def work(sink: TaskSink) -> str:
            await sink.error(message)
            return f"refused: {message}"

        return work

    def _infer(self, served: Served, frame: Frame) -> Callable[[TaskSink], Awaitable[str]]:
        async def work(sink: TaskSink) -> str:
            try:
                async with served.serving():
                    return await forward(self.upstream, served.config, frame, sink)
            except WakeFailed as exc:
                await sink.error(str(exc))
                return f"wake failed: {exc}"

        return work

    def _wake(self, served: Served) -> Callable[[TaskSink], Awaitable[str]]:
        async def work(sink: TaskSink) -> str:
            if served.power is None:
                await sink.result(200, {"status": "awake", "llmName": served.name})
                return "awake (no wake_command: always on)"
            try:
                took = await served.power.wake()
            except WakeFailed as exc:
                await sink.error(str(exc))
                return f"wake failed: {exc}"
            answer = {"status": "awake", "llmName": served.name, "seconds": round(took, 3)}
            try:
                await sink.result(200, answer)
            except TaskGone:
                # The broker stopped waiting (wake timeout) but the model is up now: say so.
                await self.report_status(served.name, "active")
                return "awake, after the broker stopped waiting"
            return "awake"

        return work

    # --- shutdown ----------------------------------------------------------------------------

    async def _withdraw(self) -> None:
        """Register an empty list: the session's rows go inactive, so new requests get 503
        publisher_offline (with Retry-After) at once while the tasks in flight finish."""
        if not self.connected or self.session_id is None:
            return
        try:
            await asyncio.wait_for(self.broker.register(self.session_id, []), 10.0)
            log.info("withdrew %d LLM(s) from the broker", len(self.served))
        except (BrokerError, httpx.HTTPError, TimeoutError) as exc:
            log.warning("could not withdraw the LLMs: %s", exc or type(exc).__name__)

    async def _set_draining(self) -> bool:
        """Drain the backends this agent adds to pools (PROTOCOL.md v1.1 "Draining"): the
        broker sends them no new task and the pool's other boxes take the traffic, so a box
        restarts under load failing nothing; the rest is withdrawn at once (a name with no
        other box gets 503 publisher_offline at once, as in v1). False if nothing pooled."""
        pooled = [served for served in self.served.values() if served.config.pool]
        if not pooled or not self.connected or self.session_id is None:
            return False
        try:
            if len(pooled) < len(self.served):
                providers = [served.provider() for served in pooled]
                await asyncio.wait_for(self.broker.register(self.session_id, providers), 10.0)
            for served in pooled:
                await asyncio.wait_for(
                    self.broker.set_status(self.session_id, served.name, "draining"), 10.0
                )
            log.info("draining %d pooled LLM(s): no new tasks", len(pooled))
            return True
        except (BrokerError, httpx.HTTPError, TimeoutError) as exc:
            log.warning("could not drain the pooled LLMs: %s", exc or type(exc).__name__)
            return False

    async def _drain(self) -> None:
        """No new tasks; give those in flight the grace period, then fail them. Pooled
        LLMs are drained first and withdrawn once their tasks ended."""
        if self.draining:
            return
        self.draining = True
        drained = await self._set_draining()
        if not drained:
            await self._withdraw()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_seconds
        if self.tasks:
            log.info("waiting for %d task(s) in flight", len(self.tasks))
        while self.tasks and not self._abort.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._task_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task_ended.wait(), remaining)
        jobs = [running.job for running in self.tasks.values() if running.job is not None]
        for running in self.tasks.values():
            running.shutdown = True
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=FAIL_POST_SECONDS + 1)
        if drained:
            await self._withdraw()

    async def aclose(self) -> None:
        for served in self.served.values():
            if served.power is not None:
                await served.power.close()
        await self.broker.aclose()
        await self.upstream.aclose()

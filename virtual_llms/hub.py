"""This process's router: one hub per event loop, with its channel on the channel layer, its
receive loop, the beat that keeps this worker alive to the others, and the tables of what
this process holds (tasks it waits on, control streams, wake waiters).

The hub only routes. What a task, a stream or a wake does lives in tasks.py, binding.py and
wake.py, which use the hub through its public methods. Messages are checked once as they
come in (protocol.hub_message).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from . import events, revocation, stream_epochs, subscription
from .auth import forget_token
from .errors import ApiError, unavailable
from .loopcache import AsyncPerLoop
from .protocol import (
    BackendEvicted,
    FailoverEvent,
    Frame,
    HubMessage,
    LlmEvicted,
    QueueReady,
    SessionClosed,
    StreamReplace,
    TaskCancel,
    TaskEvent,
    TaskEventMessage,
    TaskPush,
    TokenRevoked,
    WakeOutcomeMessage,
    error_event,
    hub_message,
)
from .state import LOOP_STALL_SECONDS, WORKER_BEAT_SECONDS, Presence, get_state

log = logging.getLogger("mcpd.hub")

# Group membership is re-asserted this often, so a Redis restart or flush loses broadcasts
# (token revoked, session closed, LLM evicted, wake outcome) for at most this long.
REJOIN_SECONDS = 30.0
# A stream handed over by a draining worker waits this long for its successor (binding.py),
# and so does a task routed to it meanwhile (_reroute).
HANDOVER_SECONDS = 5.0

EVICTED = (502, "llm_evicted", "the LLM was evicted")
DISCONNECTED = (502, "publisher_disconnected", "publisher disconnected")


@dataclass
class Pending:
    """A task this process dispatched and waits on."""

    task_id: str
    llm_id: str
    session_id: str
    token_id: int
    holder: str
    epoch: str
    queue: asyncio.Queue[TaskEvent] = field(default_factory=asyncio.Queue)
    got_data: bool = False
    # Other backends could take the task if its stream goes away before it sent anything
    # (a pool); a one-backend row fails as in v1 instead.
    spare: bool = False
    # The task's record as the requester wrote it (state/tasks.py), to write again if Redis
    # lost it (recovery.py): "<reply channel>", or "<reply channel> <llm id> <sid>" when the
    # task holds one of that backend's slots.
    record: str = ""
    # When it was made (Unix time): a lost subscription fails the tasks sent before it.
    sent: float = field(default_factory=time.time)


class Closing(enum.Enum):
    """Why a control stream ends, which the publisher is told as it ends (SSE: an event;
    WebSocket: the close code). docs/design.md "Where the contract is silent"."""

    END = "end"  # for good: the token was revoked, the stream failed
    REPLACED = "replaced"  # another stream took the session (two agents, one session?)
    RECONNECT = "reconnect"  # this worker is draining: reconnect elsewhere, at once


class ControlStream:
    """A publisher's control stream held by this process (SSE response or WebSocket)."""

    def __init__(self, session_id: str, token_id: int, transport: str = "sse") -> None:
        self.session_id = session_id
        self.token_id = token_id
        self.transport = transport  # "sse" or "ws"
        self.epoch = stream_epochs.new(transport)
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.closed = False
        self.why = Closing.END

    def push(self, frame: Frame) -> None:
        if not self.closed:
            self.queue.put_nowait(frame)

    def close(self, why: Closing = Closing.END) -> None:
        if not self.closed:
            self.closed, self.why = True, why
            self.queue.put_nowait(None)


@dataclass(frozen=True)
class WakeOutcome:
    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""
    epoch: int = 0  # the wake lease's epoch it is the outcome of
    remembered: bool = False  # a failure requests get at once for a while (wake.py)

    def error(self) -> ApiError:
        return ApiError(self.status, self.code, self.message)


class Hub:
    """This process's router. One per event loop (daphne has one; tests make several)."""

    def __init__(self) -> None:
        self.channel = ""
        self.pending: dict[str, Pending] = {}
        # The newest stream bound here per session, and every open stream by its epoch.
        self.streams: dict[str, ControlStream] = {}
        self.by_epoch: dict[str, ControlStream] = {}
        self.wake_waiters: dict[str, set[asyncio.Future[WakeOutcome]]] = {}
        # Requests waiting in an LLM's queue, by waiter id (queue.py).
        self.queue_waiters: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._stopping = False
        # With Redis, the liveness key is refreshed by a thread while the loop ticks.
        self.loop_tick = time.monotonic()
        self._beat_thread: threading.Thread | None = None
        self._beat_stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by drain.py: this worker takes no new task for the streams it holds.
        self.draining = False
        # Streams whose close (binding.stream_close: a hand-over, an unbind) is under way,
        # and those handed over that wait to hear of the stream replacing them, by epoch.
        self.closing_streams = 0
        self.handing_over: dict[str, asyncio.Event] = {}
        self._routes: dict[str, Callable[[Any], None]] = {
            "task.event": self._on_task_event,
            "task.push": self._on_task_push,
            "task.cancel": self._on_task_cancel,
            "stream.replace": self._on_stream_replace,
            "session.closed": self._on_session_closed,
            "token.revoked": self._on_token_revoked,
            "llm.evicted": self._on_llm_evicted,
            "backend.evicted": self._on_backend_evicted,
            "queue.ready": self._on_queue_ready,
            "wake.outcome": self._on_wake_outcome,
            "messages.lost": lambda message: subscription.on_messages_lost(self, message),
        }
        self.subscription = subscription.Watch()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.channel = await events.new_channel()
        await events.join_workers(self.channel)
        state = get_state()
        # Without Redis, queue notices come straight here (state/routing.py MemoryQueue).
        state.routing.on_notice(lambda channel, notice: self.route(hub_message(dict(notice))))
        presence = state.presence
        await presence.beat(self.channel)
        beat = presence.threaded_beat()
        if beat is not None:
            self._beat_thread = threading.Thread(
                target=self._beat_thread_main, args=(beat,), name="mcpd-hub-beat", daemon=True
            )
            self._beat_thread.start()
        self._loops = [
            asyncio.create_task(self._receive_loop(), name="mcpd-hub-receive"),
            asyncio.create_task(self._beat_loop(), name="mcpd-hub-beat"),
            asyncio.create_task(self._watch_loop(), name="mcpd-hub-watch"),
            asyncio.create_task(revocation.revocation_loop(self), name="mcpd-hub-revocation"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        tasks = self._loops + list(self._background)
        for task in tasks:
            task.cancel()
        # redis-py can turn a cancellation into a TimeoutError the loop would retry; the
        # _stopping flag ends the loops then, and the wait is bounded either way.
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._beat_stop.set()
        if self._beat_thread is not None:  # before gone(): no beat may come after it
            await asyncio.to_thread(self._beat_thread.join, 5)
        try:
            await events.leave_workers(self.channel)
            state = get_state()
            await state.presence.gone(self.channel)
            await state.aclose()
            await events.close_layer()
        except Exception:
            log.debug("hub stop cleanup failed", exc_info=True)

    async def drain(self) -> None:
        """This worker drains (drain.py): no new task for the streams held here, whose
        publishers are told to reconnect elsewhere; the tasks already sent go on."""
        self.draining = True
        await get_state().presence.beat(self.channel, draining=True)
        for stream in list(self.by_epoch.values()):
            stream.close(Closing.RECONNECT)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must outlive the request that started it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- loops ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                raw = await events.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                if unavailable(exc) is None:  # an outage is logged once, by the beat
                    log.exception("hub receive failed; retrying")
                await asyncio.sleep(0.5)
                continue
            try:
                self.route(hub_message(raw))
            except Exception:
                log.exception("hub could not route %s", raw.get("type"))

    def _beat_thread_main(self, beat: Callable[[str, bool], bool]) -> None:
        """Refresh this worker's liveness key every WORKER_BEAT_SECONDS from a thread, as long
        as the event loop ticked within LOOP_STALL_SECONDS: a loop that is only slow (a full
        machine) stays alive to the other workers; one that is stuck, or a process killed
        with SIGKILL, stops beating and is taken for dead within WORKER_TTL_MS. A beat that
        finds its key gone (Redis restarted or flushed) has what this worker holds written
        again at once (recovery.py). One log line per outage and one per recovery."""
        from . import recovery

        down_since: float | None = None
        while not self._beat_stop.wait(WORKER_BEAT_SECONDS):
            if time.monotonic() - self.loop_tick > LOOP_STALL_SECONDS:
                continue
            try:
                found = beat(self.channel, self.draining)
            except Exception as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    recovery.log_outage(exc)
                continue
            if down_since is not None:
                recovery.log_back(time.monotonic() - down_since)
                down_since = None
                found = False  # write back what may be lost, and re-open subscriptions
            if not found and self._loop is not None:
                self._loop.call_soon_threadsafe(self._reassert)

    def _reassert(self) -> None:
        from . import recovery

        self.subscription.recovered_at = time.monotonic()
        self.spawn(recovery.reassert(self))

    async def _beat_loop(self) -> None:
        """Show the beat thread that the loop runs (or, without one, beat from here); rejoin
        the workers' group now and then."""
        presence = get_state().presence
        last_join = time.monotonic()
        while True:
            await asyncio.sleep(WORKER_BEAT_SECONDS)
            self.loop_tick = time.monotonic()
            try:
                if self._beat_thread is None:
                    await presence.beat(self.channel, self.draining)
                if time.monotonic() - last_join > REJOIN_SECONDS:
                    await events.join_workers(self.channel)
                    last_join = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                log.exception("hub heartbeat failed")

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WORKER_BEAT_SECONDS)
            try:
                if await events.resubscribe_dropped():
                    log.warning("the channel layer's subscriptions dropped; subscribed again")
                await self.subscription.check(self)
                await self._check_holders()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                if unavailable(exc) is None:  # an outage is logged once, by the beat
                    log.exception("hub could not check the stream holders")

    async def _check_holders(self) -> None:
        """Fail the tasks whose stream was held by a worker that died without cleaning up."""
        # A task being routed has no holder yet (routing.send sets it once route() answers).
        remote = {p.holder for p in self.pending.values() if p.holder not in ("", self.channel)}
        if not remote:
            return
        presence = get_state().presence
        alive = await presence.live(sorted(remote))
        moved: dict[str, Presence | None] = {}
        for p in list(self.pending.values()):
            if p.holder in remote and p.holder not in alive:
                # A worker that drained handed its streams over before it exited: the task
                # was delivered, or forwarded to the session's new stream (_reroute), and
                # its answer comes from the publisher as ever.
                if p.session_id not in moved:
                    moved[p.session_id] = await presence.lookup(p.session_id)
                now = moved[p.session_id]
                if now is not None and now.epoch != p.epoch:
                    p.holder, p.epoch = now.channel, now.epoch
                    continue
                died = (503, "publisher_offline", "the worker holding the stream died")
                self.spawn(self.lost(p, died[2], DISCONNECTED if p.got_data else died))

    # --- routing ---------------------------------------------------------------------------

    def route(self, message: HubMessage) -> None:
        """Handle a message addressed to this hub (from the channel layer, or from this
        process when the stream or the request is right here)."""
        self._routes[message["type"]](message)

    def _on_task_event(self, message: TaskEventMessage) -> None:
        pending = self.pending.get(message["taskId"])
        if pending is not None:
            pending.queue.put_nowait(message["event"])

    def _on_task_push(self, message: TaskPush) -> None:
        stream = self.open_stream(message["sid"], message["epoch"])
        if stream is None:
            self.spawn(self._reroute(message))
            return
        frame = message["frame"]
        model = message.get("models", {}).get(message["sid"])
        if model is not None and frame["kind"] == "infer":
            frame = {**frame, "body": {**frame["body"], "model": model}}
        stream.push(frame)

    def _on_task_cancel(self, message: TaskCancel) -> None:
        stream = self.open_stream(message["sid"], message["epoch"])
        if stream is not None:
            stream.push({"kind": "cancel", "taskId": message["taskId"]})

    def _on_stream_replace(self, message: StreamReplace) -> None:
        stream = self.by_epoch.get(message["epoch"])
        if stream is not None:
            stream.close(Closing.REPLACED)
        handed_over = self.handing_over.get(message["epoch"])
        if handed_over is not None:
            handed_over.set()

    def _on_session_closed(self, message: SessionClosed) -> None:
        for p in list(self.pending.values()):
            if p.session_id == message["sid"] and p.epoch == message["epoch"]:
                self.spawn(self.lost(p, "the publisher's stream closed", DISCONNECTED))

    def _on_token_revoked(self, message: TokenRevoked) -> None:
        forget_token(token_id=message["tokenId"])
        for stream in list(self.by_epoch.values()):
            if stream.token_id == message["tokenId"]:
                stream.close()

    def _on_llm_evicted(self, message: LlmEvicted) -> None:
        llm_id = message["llmId"]
        for p in list(self.pending.values()):
            if p.llm_id == llm_id:
                self.spawn(self.fail_pending(p, *EVICTED))
        self.resolve_wake(llm_id, WakeOutcome(False, *EVICTED, epoch=1 << 62))

    def _on_backend_evicted(self, message: BackendEvicted) -> None:
        for p in list(self.pending.values()):
            if p.llm_id == message["llmId"] and p.session_id == message["sid"]:
                self.spawn(self.fail_pending(p, *EVICTED))

    def _on_queue_ready(self, message: QueueReady) -> None:
        future = self.queue_waiters.get(message["waiter"])
        if future is not None and not future.done():
            future.set_result(None)

    def _on_wake_outcome(self, message: WakeOutcomeMessage) -> None:
        self.resolve_wake(
            message["llmId"],
            WakeOutcome(
                message["ok"],
                message["status"],
                message["code"],
                message["message"],
                message["epoch"],
                remembered=not message["ok"]
                and message["code"] not in ("publisher_offline", "llm_evicted"),
            ),
        )

    def open_stream(self, session_id: str, epoch: str) -> ControlStream | None:
        """The stream a message was routed to, or the session's newer stream held here."""
        stream = self.by_epoch.get(epoch)
        if stream is None or stream.closed:
            stream = self.streams.get(session_id)
        return stream if stream is not None and not stream.closed else None

    async def _reroute(self, message: TaskPush) -> None:
        """The stream this task was routed to is gone. If the session is bound elsewhere now
        (the publisher reconnected), forward the task there; else fail it, once."""
        frame = message["frame"]
        state = get_state()
        handed_over = self.handing_over.get(message["epoch"])
        if handed_over is not None:  # this worker drains: the stream's successor is near
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handed_over.wait(), HANDOVER_SECONDS)
        presence = await state.presence.lookup(message["sid"])
        if presence is not None and presence.epoch != message["epoch"] and message["hops"] < 2:
            await self.send(
                presence, {**message, "epoch": presence.epoch, "hops": message["hops"] + 1}
            )
            return
        if await state.tasks.take(frame["taskId"], message["tokenId"]) is not None:
            # The request fails over if it can (a pool), else fails with 503 as in v1.
            failover: FailoverEvent = {
                "kind": "failover",
                "reason": "the publisher's stream closed",
            }
            await deliver_event(message["reply"], frame["taskId"], failover)

    async def send(self, presence: Presence, message: HubMessage) -> None:
        """Route a message to the hub holding a stream: this one directly, another through
        the channel layer."""
        if presence.channel == self.channel:
            self.route(message)
        else:
            await events.send(presence.channel, message)

    async def lost(self, p: Pending, reason: str, error: tuple[int, str, str]) -> None:
        """The task's stream went away (closed, or its worker died). A task of a pool that
        relayed nothing yet is sent again to another backend (the request hears
        ``failover``); any other fails with ``error``, as in v1. Once: whoever takes its
        record decides."""
        if p.got_data or not p.spare:
            await self.fail_pending(p, *error)
        elif await get_state().tasks.take(p.task_id, p.token_id) is not None:
            p.queue.put_nowait({"kind": "failover", "reason": reason})

    async def fail_pending(self, p: Pending, status: int, code: str, message: str) -> None:
        """End a local task with an error, once: whoever takes its record decides."""
        if await get_state().tasks.take(p.task_id, p.token_id) is not None:
            p.queue.put_nowait(error_event(status, code, message))

    # --- wake waiters ----------------------------------------------------------------------

    def wake_wait(self, llm_id: str) -> asyncio.Future[WakeOutcome]:
        future: asyncio.Future[WakeOutcome] = asyncio.get_running_loop().create_future()
        self.wake_waiters.setdefault(llm_id, set()).add(future)
        return future

    def wake_waiting(self) -> int:
        """How many calls on this worker wait for a wake (metrics: mcpd_wake_waiting)."""
        return sum(len(waiters) for waiters in self.wake_waiters.values())

    def wake_unwait(self, llm_id: str, future: asyncio.Future[WakeOutcome]) -> None:
        waiters = self.wake_waiters.get(llm_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self.wake_waiters[llm_id]

    def queue_wait(self, waiter: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue_waiters[waiter] = future
        return future

    def queue_unwait(self, waiter: str) -> None:
        self.queue_waiters.pop(waiter, None)

    def resolve_wake(self, llm_id: str, outcome: WakeOutcome) -> None:
        for future in self.wake_waiters.get(llm_id, ()):
            if not future.done():
                future.set_result(outcome)


def task_event_message(task_id: str, event: TaskEvent) -> TaskEventMessage:
    return {"type": "task.event", "taskId": task_id, "event": event}


async def deliver_event(reply: str, task_id: str, event: TaskEvent) -> None:
    """Hand a task event to the hub of the request that waits on it. Always through the
    channel layer (or, with Redis, a PUBLISH of its bytes from a script: tasks.answer), even
    when that hub is this one: the events of one task keep one path, Redis's order of
    execution, so a chunk batch POSTed here can never overtake an earlier one POSTed to
    another worker."""
    await events.send(reply, task_event_message(task_id, event))


_hubs: AsyncPerLoop[Hub] = AsyncPerLoop()


async def _started() -> Hub:
    hub = Hub()
    await hub.start()
    return hub


async def get_hub() -> Hub:
    """This event loop's hub, started on first use."""
    return await _hubs.get(_started)


def current_hub() -> Hub | None:
    """This event loop's hub, if it was started."""
    return _hubs.peek()


async def stop_hub() -> None:
    """Stop this loop's hub (tests; daphne simply exits)."""
    hub = _hubs.pop()
    if hub is not None:
        await hub.stop()

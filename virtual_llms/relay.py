"""The task lifecycle across workers: enqueue, deliver, result, chunk, fail, cancel, timeout,
and wake-before-infer.

Each worker process runs one :class:`Hub` on its event loop. The hub owns one channel of the
channel layer and routes what arrives on it: task frames to the control streams this process
holds, task events to the requests this process serves, and broadcast notices. Who holds which
session, which tasks are open and who leads a wake live in :mod:`.state` (Redis, or memory in
the one-process broker), so a request, the publisher's stream and its result POST may each
land on a different worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from . import events, jsonio, selectors, services
from .auth import forget_token
from .errors import ApiError, offline
from .models import Llm, LlmKind, LlmStatus
from .state import (
    LOOP_STALL_SECONDS,
    WORKER_BEAT_SECONDS,
    CheckedOpen,
    Presence,
    RedisState,
    get_state,
)

log = logging.getLogger("mcpd.relay")

# A wake lease lives this long unless its leader refreshes it (every WAKE_LEASE_MS / 5):
# a leader killed with SIGKILL delays the next wake by at most this much.
WAKE_LEASE_MS = 5000
# A cached row is re-read at least this often even if no stamp changed: the bound on how long
# a write made behind mcpd's back (raw SQL, a lost stamp update) can go unseen.
ROW_CACHE_SECONDS = 10.0
# Entries for rows this process asked for; past this many the cache starts over.
ROW_CACHE_SIZE = 10_000
# Group membership is re-asserted this often, so a Redis restart or flush loses broadcasts
# (token revoked, session closed, LLM evicted, wake outcome) for at most this long.
REJOIN_SECONDS = 30.0


@dataclass(frozen=True)
class LlmRef:
    """What the relay needs of a virtual row, read once per request."""

    id: uuid.UUID
    name: str
    model: str
    status: str
    session_id: str
    token_id: int


@dataclass
class Pending:
    """A task this process dispatched and waits on."""

    task_id: str
    llm_id: str
    session_id: str
    token_id: int
    holder: str
    epoch: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    got_data: bool = False


class ControlStream:
    """A publisher's control stream held by this process (SSE response or WebSocket)."""

    def __init__(self, session_id: str, token_id: int) -> None:
        self.session_id = session_id
        self.token_id = token_id
        self.epoch = secrets.token_hex(8)
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.closed = False

    def push(self, frame: dict[str, Any]) -> None:
        if not self.closed:
            self.queue.put_nowait(frame)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


@dataclass(frozen=True)
class WakeOutcome:
    ok: bool
    status: int = 200
    code: str = ""
    message: str = ""

    def error(self) -> ApiError:
        return ApiError(self.status, self.code, self.message)


def _error_event(status: int, code: str, message: str) -> dict[str, Any]:
    return {"kind": "error", "status": status, "code": code, "message": message}


EVICTED = "the LLM was evicted"
DISCONNECTED = (502, "publisher_disconnected", "publisher disconnected")


class Hub:
    """This process's router. One per event loop (daphne has one; tests make several)."""

    def __init__(self) -> None:
        self.channel = ""
        self.pending: dict[str, Pending] = {}
        # The newest stream bound here per session, and every open stream by its epoch.
        self.streams: dict[str, ControlStream] = {}
        self.by_epoch: dict[str, ControlStream] = {}
        self.wake_waiters: dict[str, set[asyncio.Future[WakeOutcome]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._stopping = False
        # With Redis, the liveness key is refreshed by a thread while the loop ticks.
        self.loop_tick = time.monotonic()
        self._beat_thread: threading.Thread | None = None
        self._beat_stop = threading.Event()

    async def start(self) -> None:
        self.channel = await events.new_channel()
        await events.join_workers(self.channel)
        state = get_state()
        await state.worker_beat(self.channel)
        if isinstance(state, RedisState):
            self._beat_thread = threading.Thread(
                target=self._beat_thread_main,
                args=(state,),
                name="mcpd-hub-beat",
                daemon=True,
            )
            self._beat_thread.start()
        self._loops = [
            asyncio.create_task(self._receive_loop(), name="mcpd-hub-receive"),
            asyncio.create_task(self._beat_loop(), name="mcpd-hub-beat"),
            asyncio.create_task(self._watch_loop(), name="mcpd-hub-watch"),
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
        if self._beat_thread is not None:  # before worker_gone: no beat may come after it
            await asyncio.to_thread(self._beat_thread.join, 5)
        try:
            await events.leave_workers(self.channel)
            await get_state().worker_gone(self.channel)
            await get_state().aclose()
            await events.close_layer()
        except Exception:
            log.debug("hub stop cleanup failed", exc_info=True)

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
                message = await events.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                log.exception("hub receive failed; retrying")
                await asyncio.sleep(0.5)
                continue
            try:
                self._on_message(message)
            except Exception:
                log.exception("hub could not route %s", message.get("type"))

    def _beat_thread_main(self, state: RedisState) -> None:
        """Refresh this worker's liveness key every WORKER_BEAT_SECONDS from a thread, as long
        as the event loop ticked within LOOP_STALL_SECONDS: a loop that is only slow (a full
        machine) stays alive to the other workers; one that is stuck, or a process killed
        with SIGKILL, stops beating and is taken for dead within WORKER_TTL_MS."""
        failing = False
        while not self._beat_stop.wait(WORKER_BEAT_SECONDS):
            if time.monotonic() - self.loop_tick > LOOP_STALL_SECONDS:
                continue
            try:
                state.worker_beat_sync(self.channel)
                failing = False
            except Exception:
                if not failing:  # once per outage, not three times a second
                    log.exception("hub heartbeat failed")
                failing = True

    async def _beat_loop(self) -> None:
        """Show the beat thread that the loop runs (or, without Redis, beat from here); rejoin
        the workers' group now and then."""
        state = get_state()
        last_join = time.monotonic()
        while True:
            await asyncio.sleep(WORKER_BEAT_SECONDS)
            self.loop_tick = time.monotonic()
            try:
                if self._beat_thread is None:
                    await state.worker_beat(self.channel)
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
                await self._check_holders()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                log.exception("hub could not check the stream holders")

    async def _check_holders(self) -> None:
        """Fail the tasks whose stream was held by a worker that died without cleaning up."""
        remote = {p.holder for p in self.pending.values() if p.holder != self.channel}
        if not remote:
            return
        alive = await get_state().live_workers(sorted(remote))
        for p in list(self.pending.values()):
            if p.holder in remote and p.holder not in alive:
                if p.got_data:
                    self.spawn(self.fail_pending(p, *DISCONNECTED))
                else:
                    self.spawn(
                        self.fail_pending(
                            p, 503, "publisher_offline", "the worker holding the stream died"
                        )
                    )

    # --- routing ---------------------------------------------------------------------------

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "task.event":
            pending = self.pending.get(message["taskId"])
            if pending is not None:
                pending.queue.put_nowait(message["event"])
        elif kind == "task.push":
            stream = self._open_stream(message["sid"], message["epoch"])
            if stream is not None:
                stream.push(message["frame"])
            else:
                self.spawn(self._reroute(message))
        elif kind == "task.cancel":
            stream = self._open_stream(message["sid"], message["epoch"])
            if stream is not None:
                stream.push({"kind": "cancel", "taskId": message["taskId"]})
        elif kind == "stream.replace":
            stream = self.by_epoch.get(message["epoch"])
            if stream is not None:
                stream.close()
        elif kind == "session.closed":
            for p in list(self.pending.values()):
                if p.session_id == message["sid"] and p.epoch == message["epoch"]:
                    self.spawn(self.fail_pending(p, *DISCONNECTED))
        elif kind == "token.revoked":
            forget_token(token_id=message["tokenId"])
            for stream in list(self.by_epoch.values()):
                if stream.token_id == message["tokenId"]:
                    stream.close()
        elif kind == "llm.evicted":
            llm_id = message["llmId"]
            for p in list(self.pending.values()):
                if p.llm_id == llm_id:
                    self.spawn(self.fail_pending(p, 502, "llm_evicted", EVICTED))
            self._resolve_wake(
                llm_id, WakeOutcome(False, 502, "llm_evicted", "the LLM was evicted")
            )
        elif kind == "wake.outcome":
            self._resolve_wake(
                message["llmId"],
                WakeOutcome(message["ok"], message["status"], message["code"], message["message"]),
            )
        else:
            log.warning("hub got an unknown message type %r", kind)

    def _open_stream(self, session_id: str, epoch: str) -> ControlStream | None:
        """The stream a message was routed to, or the session's newer stream held here."""
        stream = self.by_epoch.get(epoch)
        if stream is None or stream.closed:
            stream = self.streams.get(session_id)
        return stream if stream is not None and not stream.closed else None

    async def _reroute(self, message: dict[str, Any]) -> None:
        """The stream this task was routed to is gone. If the session is bound elsewhere now
        (the publisher reconnected), forward the task there; else fail it, once."""
        frame = message["frame"]
        presence = await get_state().lookup_session(message["sid"])
        if presence is not None and presence.epoch != message["epoch"] and message["hops"] < 2:
            await _route(
                presence, {**message, "epoch": presence.epoch, "hops": message["hops"] + 1}
            )
            return
        if await get_state().task_take(frame["taskId"], message["tokenId"]) is not None:
            await deliver_event(
                message["reply"],
                frame["taskId"],
                _error_event(503, "publisher_offline", "the publisher's stream closed"),
            )

    async def fail_pending(self, p: Pending, status: int, code: str, message: str) -> None:
        """End a local task with an error, once: whoever takes its record decides."""
        if await get_state().task_take(p.task_id, p.token_id) is not None:
            p.queue.put_nowait(_error_event(status, code, message))

    # --- wake waiters ----------------------------------------------------------------------

    def wake_wait(self, llm_id: str) -> asyncio.Future[WakeOutcome]:
        future: asyncio.Future[WakeOutcome] = asyncio.get_running_loop().create_future()
        self.wake_waiters.setdefault(llm_id, set()).add(future)
        return future

    def wake_unwait(self, llm_id: str, future: asyncio.Future[WakeOutcome]) -> None:
        waiters = self.wake_waiters.get(llm_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self.wake_waiters[llm_id]

    def _resolve_wake(self, llm_id: str, outcome: WakeOutcome) -> None:
        for future in self.wake_waiters.get(llm_id, ()):
            if not future.done():
                future.set_result(outcome)


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}
_hub_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}


async def get_hub() -> Hub:
    """This event loop's hub, started on first use."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is not None:
        return hub
    lock = _hub_locks.setdefault(loop, asyncio.Lock())
    async with lock:
        hub = _hubs.get(loop)
        if hub is None:
            for old in [lp for lp in _hubs if lp.is_closed()]:
                del _hubs[old]
                _hub_locks.pop(old, None)
            hub = Hub()
            await hub.start()
            _hubs[loop] = hub
    return hub


async def stop_hub() -> None:
    """Stop this loop's hub (tests; daphne simply exits)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.pop(loop, None)
    _hub_locks.pop(loop, None)
    if hub is not None:
        await hub.stop()


async def deliver_event(reply: str, task_id: str, event: dict[str, Any]) -> None:
    """Hand a task event to the hub of the request that waits on it. Always through the
    channel layer (or, with Redis, a PUBLISH of its bytes from a script: _post), even when
    that hub is this one: the events of one task keep one path, Redis's order of
    execution, so a chunk batch POSTed here can never overtake an earlier one POSTed to
    another worker."""
    await events.send(reply, _task_event(task_id, event))


def _task_event(task_id: str, event: dict[str, Any]) -> dict[str, Any]:
    return {"type": "task.event", "taskId": task_id, "event": event}


# --- the requester's side ------------------------------------------------------------------


def ref_of(row: Llm) -> LlmRef:
    assert row.provider_session_id is not None
    assert row.publisher_token_id is not None
    return LlmRef(
        id=row.id,
        name=row.name,
        model=row.model,
        status=row.status,
        session_id=row.provider_session_id,
        token_id=row.publisher_token_id,
    )


@dataclass(frozen=True)
class _CachedRow:
    row: Llm
    stamp: str
    read_at: float
    # Who held the row's session stream at the last lookup (open_cached's expectation).
    presence: Presence | None = None


async def llm_lookup(
    name: str, checked: tuple[str, Presence | None] | None = None
) -> tuple[Llm | None, Presence | None]:
    """The row called ``name`` and who holds its session's stream, in one round trip to the
    shared state when the row is cached here: the cached copy is used only while the stamps
    of its name, its session and "everything" are those it was read under (services touch
    them on every write, state.py). Otherwise one row read on the ORM thread. ``checked``:
    the stamps and holder open_cached just read for the cached row's session (no second
    round trip for them)."""
    state = get_state()
    cache: dict[str, _CachedRow] = state.rows
    cached = cache.get(name)
    sid = (cached.row.provider_session_id or "") if cached is not None else ""
    for _ in range(3):
        stamp, presence = checked or await state.llm_check(name, sid)
        checked = None
        fresh = cached is not None and time.monotonic() - cached.read_at < ROW_CACHE_SECONDS
        if cached is not None and fresh and cached.stamp == stamp:
            if cached.presence != presence:
                cache[name] = dataclasses.replace(cached, presence=presence)
            return cached.row, presence
        # Read after the stamps: a write that commits later touches them again.
        row = await sync_to_async(selectors.llm_get)(name=name)
        if row is None:
            cache.pop(name, None)
            return None, None
        row_sid = row.provider_session_id or ""
        if row_sid == sid:
            if len(cache) >= ROW_CACHE_SIZE:
                cache.clear()
            cache[name] = _CachedRow(row, stamp, time.monotonic(), presence)
            return row, presence
        # The row moved to another session: read that session's stamp, then the row again.
        cached, sid = None, row_sid
    # Still moving after three reads: serve the last one uncached.
    return row, (await state.lookup_session(sid) if sid else None)


@dataclass(frozen=True)
class Opened:
    """open_cached's answer: the task sent (``pending``, for ``row``), or else what its
    round trip read for llm_lookup (``checked``), or nothing to go on."""

    row: Llm | None = None
    pending: Pending | None = None
    checked: tuple[str, Presence | None] | None = None


async def open_cached(name: str, body: dict[str, Any], streaming: bool, endpoint: str) -> Opened:
    """The common request in one round trip to the shared state: a virtual, active row cached
    here whose session's stream was held at the last lookup. The infer task is opened and
    sent to that stream's hub by one script, only if the row's stamps and the stream's holder
    are still those (state.task_open_checked); otherwise nothing is sent, and the caller goes
    the long way (llm_lookup with ``checked``, then enqueue_infer)."""
    state = get_state()
    cached: _CachedRow | None = state.rows.get(name)
    if (
        cached is None
        or cached.presence is None
        or time.monotonic() - cached.read_at >= ROW_CACHE_SECONDS
        or cached.row.kind != LlmKind.VIRTUAL
        or cached.row.status != LlmStatus.ACTIVE
    ):
        return Opened()
    llm = ref_of(cached.row)
    hub = await get_hub()
    presence = cached.presence
    pending, message, record = _new_task(
        hub, llm, _infer_frame(llm, body, streaming, endpoint), presence
    )
    local = presence.channel == hub.channel
    payload = None if local else events.direct_payload(message)
    if payload is None and not local:
        return Opened()  # not the Redis pub/sub layer: nothing can be published from a script
    check = CheckedOpen(name, llm.session_id, cached.stamp, presence)
    hub.pending[pending.task_id] = pending
    try:
        stamp, now, opened = await state.task_open_checked(
            check, pending.task_id, llm.token_id, record, payload
        )
    except BaseException:
        hub.pending.pop(pending.task_id, None)
        await state.task_take(pending.task_id, llm.token_id)
        raise
    if not opened:
        hub.pending.pop(pending.task_id, None)
        return Opened(checked=(stamp, now))
    if local:
        hub._on_message(message)
    return Opened(row=cached.row, pending=pending)


async def load_virtual(name: str) -> LlmRef:
    """The virtual row called ``name`` (one read), or ApiError 404 / 400 for a public row."""
    row = await sync_to_async(selectors.llm_get)(name=name)
    if row is None:
        raise ApiError(404, "model_not_found", f"The model '{name}' does not exist.")
    if row.kind != LlmKind.VIRTUAL:
        raise ApiError(400, "not_virtual", f"'{name}' is not a virtual provider.")
    return ref_of(row)


async def _reload(name: str) -> LlmRef | None:
    try:
        return await load_virtual(name)
    except ApiError:
        return None


async def enqueue_infer(
    llm: LlmRef,
    body: dict[str, Any],
    streaming: bool,
    endpoint: str = "/v1/chat/completions",
    presence: Presence | None = None,
) -> tuple[Pending, float]:
    """The original service's enqueueInferTask: an inactive row is refused (503), a
    hibernating one is woken first (once across workers), then the infer task goes down the
    publisher's stream. Returns the pending task and the seconds spent waking."""
    if llm.status == LlmStatus.INACTIVE:
        raise offline(f"The publisher of '{llm.name}' is inactive (publisher offline).")
    woke = 0.0
    if llm.status == LlmStatus.HIBERNATING:
        await require_stream(llm)
        woke = await ensure_awake(llm)
        presence = None  # looked up again after the wake
    return await dispatch(llm, _infer_frame(llm, body, streaming, endpoint), presence), woke


def _infer_frame(
    llm: LlmRef, body: dict[str, Any], streaming: bool, endpoint: str
) -> dict[str, Any]:
    return {
        "kind": "infer",
        "llmName": llm.name,
        "streaming": streaming,
        "endpoint": endpoint,
        "body": {**body, "model": llm.model},
    }


def _new_task(
    hub: Hub, llm: LlmRef, frame: dict[str, Any], presence: Presence
) -> tuple[Pending, dict[str, Any], str]:
    """A new task of ``llm`` for the stream ``presence`` names: what this hub waits on, the
    channel-layer message that carries its frame, and its record in the shared state (which
    starts with the requester's hub channel: state.py reads it there)."""
    task_id = secrets.token_urlsafe(18)
    pending = Pending(
        task_id=task_id,
        llm_id=str(llm.id),
        session_id=llm.session_id,
        token_id=llm.token_id,
        holder=presence.channel,
        epoch=presence.epoch,
    )
    message = {
        "type": "task.push",
        "sid": llm.session_id,
        "epoch": presence.epoch,
        "hops": 0,
        "frame": {**frame, "taskId": task_id},
        "reply": hub.channel,
        "tokenId": llm.token_id,
    }
    return pending, message, f"{hub.channel} {llm.session_id}"


async def dispatch(llm: LlmRef, frame: dict[str, Any], presence: Presence | None = None) -> Pending:
    """Send a task frame down the stream of the LLM's session, wherever it is held (given,
    when it was just looked up with the row, or looked up now)."""
    hub = await get_hub()
    state = get_state()
    if presence is None:
        presence = await state.lookup_session(llm.session_id)
    if presence is None:
        raise offline(f"The publisher of '{llm.name}' holds no control stream.")
    pending, message, record = _new_task(hub, llm, frame, presence)
    task_id = pending.task_id
    hub.pending[task_id] = pending
    try:
        payload = events.direct_payload(message) if presence.channel != hub.channel else None
        if payload is not None:
            await state.task_open(task_id, llm.token_id, record, presence.channel, payload)
        else:
            await state.task_put(task_id, llm.token_id, record)
            await _route(presence, message)
    except BaseException:
        hub.pending.pop(task_id, None)
        await state.task_take(task_id, llm.token_id)
        raise
    return pending


async def _route(presence: Presence, message: dict[str, Any]) -> None:
    hub = _hubs.get(asyncio.get_running_loop())
    if hub is not None and presence.channel == hub.channel:
        hub._on_message(message)  # the stream is held right here: skip the channel layer
    else:
        await events.send(presence.channel, message)


def silence_error() -> ApiError:
    timeout = settings.MCPD_INFER_TIMEOUT_SECONDS
    return ApiError(
        504, "timeout", f"The publisher sent nothing for {timeout:g} s; the task was cancelled."
    )


async def require_stream(llm: LlmRef) -> None:
    """503 at once if the LLM's publisher holds no control stream (nothing to wake)."""
    if await get_state().lookup_session(llm.session_id) is None:
        raise offline(f"The publisher of '{llm.name}' holds no control stream.")


async def next_event(p: Pending, timeout: float) -> dict[str, Any]:
    """The task's next event, or ApiError 504 after ``timeout`` seconds of silence."""
    try:
        async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per call
            event = await p.queue.get()
    except TimeoutError:
        if timeout == settings.MCPD_INFER_TIMEOUT_SECONDS:
            raise silence_error() from None
        raise ApiError(504, "timeout", f"No answer within {timeout:g} s.") from None
    p.got_data = True
    return event


async def finish(p: Pending) -> None:
    """The task ended normally (its record was taken by whoever posted the last event)."""
    hub = await get_hub()
    hub.pending.pop(p.task_id, None)


async def abandon(p: Pending) -> None:
    """The client left, or the wait timed out: forget the task and tell the publisher to stop.
    Later results for it get 404."""
    hub = await get_hub()
    hub.pending.pop(p.task_id, None)
    state = get_state()
    if await state.task_take(p.task_id, p.token_id) is None:
        return  # it had already ended
    presence = await state.lookup_session(p.session_id)
    if presence is not None:
        await _route(
            presence,
            {
                "type": "task.cancel",
                "sid": p.session_id,
                "epoch": presence.epoch,
                "taskId": p.task_id,
            },
        )


# --- the publisher's side: results, chunks, errors (any worker) ----------------------------


async def _post(task_id: str, token_id: int, event: dict[str, Any], *, take: bool) -> bool:
    """Hand a publisher's answer to the request waiting on the task. False when there is no
    such open task of this token (unknown, finished, cancelled, another token's, or its
    requester died). ``take`` ends the task: it is taken once, and given back if the hand-over
    fails, so the publisher's retry finds it and nothing is lost."""
    state = get_state()
    payload = events.direct_payload(_task_event(task_id, event))
    # With the Redis layer, the script that reads the record also publishes the event.
    record = await (state.task_take if take else state.task_get)(task_id, token_id, payload)
    if record is None:
        return False
    if payload is None:
        try:
            await deliver_event(record.split(" ", 1)[0], task_id, event)
        except BaseException:
            if take:
                await state.task_put(task_id, token_id, record)
            raise
    return True


async def post_result(*, token_id: int, task_id: str, status: int, body: Any) -> bool:
    # The body travels as JSON bytes, which the client's worker writes as they are: neither
    # the channel layer (a deep copy in memory, msgpack through Redis) nor that worker walks
    # a big answer (a batch of embeddings: 25,000 floats) again. result_body() reads it.
    event = {"kind": "result", "status": status, "json": jsonio.dumps(body)}
    return await _post(task_id, token_id, event, take=True)


def result_body(event: dict[str, Any]) -> Any:
    """The body of a ``result`` event (post_result)."""
    return jsonio.loads(event["json"])


async def post_chunks(*, token_id: int, task_id: str, chunks: list[dict[str, Any]]) -> bool:
    done = any(chunk.get("done") for chunk in chunks)
    return await _post(task_id, token_id, {"kind": "chunks", "chunks": chunks}, take=done)


async def post_error(*, token_id: int, task_id: str, message: str) -> bool:
    event = _error_event(502, "publisher_error", message)
    return await _post(task_id, token_id, event, take=True)


# --- control streams (the holder's side) ----------------------------------------------------


async def stream_open(stream: ControlStream) -> None:
    """Bind the stream's session to it, here; the stream it replaces, on whichever worker,
    is closed (Redis decides which bind came last). Pair with stream_close in a finally:."""
    hub = await get_hub()
    session_id = stream.session_id
    hub.by_epoch[stream.epoch] = stream
    previous = await get_state().bind_session(session_id, hub.channel, stream.epoch)
    hub.streams[session_id] = stream
    if previous is not None and previous.epoch != stream.epoch:
        await _route(
            previous, {"type": "stream.replace", "sid": session_id, "epoch": previous.epoch}
        )
    log.info("session %s bound (epoch %s)", session_id, stream.epoch)


async def stream_refresh(stream: ControlStream) -> bool:
    """Keep the presence record alive. False once another stream has taken the session, or
    the stream's token was revoked (the check that holds even if a broadcast was lost)."""
    hub = await get_hub()
    if await sync_to_async(services.token_is_revoked)(token_id=stream.token_id):
        return False
    return await get_state().refresh_session(stream.session_id, hub.channel, stream.epoch)


async def stream_frames(stream: ControlStream) -> AsyncIterator[dict[str, Any] | None]:
    """What to send down a bound control stream: its task frames in order, and None each
    time a keep-alive is due (every MCPD_PING_SECONDS, when the presence record is refreshed
    too). Ends when the stream is closed, replaced, or its token revoked."""
    loop = asyncio.get_running_loop()
    next_ping = loop.time() + settings.MCPD_PING_SECONDS
    while True:
        wait = next_ping - loop.time()
        if wait <= 0:
            if not await stream_refresh(stream):
                return
            yield None
            next_ping = loop.time() + settings.MCPD_PING_SECONDS
            continue
        try:
            async with asyncio.timeout(wait):
                frame = await stream.queue.get()
        except TimeoutError:
            continue
        if frame is None:
            return
        yield frame


async def stream_close(stream: ControlStream) -> None:
    """The stream ended. Unless a newer stream took over, the session is unbound: its rows go
    inactive and its tasks in flight fail with "publisher disconnected"."""
    hub = await get_hub()
    stream.closed = True
    hub.by_epoch.pop(stream.epoch, None)
    if hub.streams.get(stream.session_id) is stream:
        del hub.streams[stream.session_id]
    state = get_state()
    sid = stream.session_id
    if not await state.release_session(sid, hub.channel, stream.epoch):
        log.info("session %s stream replaced (epoch %s)", sid, stream.epoch)
        return
    await events.broadcast({"type": "session.closed", "sid": sid, "epoch": stream.epoch})
    unbound_at = await sync_to_async(services.session_unbind)(session_id=sid)
    if await state.lookup_session(sid) is not None:
        # The publisher reconnected while we unbound: give the new stream its rows back.
        await sync_to_async(services.session_rebind)(session_id=sid, unbound_at=unbound_at)
        log.info("session %s rebound by a newer stream", sid)
    else:
        log.info("session %s unbound", sid)


# --- wake before infer ----------------------------------------------------------------------


def _wake_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return f"wake failed: {json.dumps(body)[:500]}"


async def ensure_awake(llm: LlmRef) -> float:
    """Wait until a hibernating LLM is awake, waking it if nobody else is: one wake per LLM
    across all workers. Returns the seconds waited. Raises ApiError for every failure."""
    hub = await get_hub()
    state = get_state()
    key = f"wake:{llm.id}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + settings.MCPD_WAKE_TIMEOUT_SECONDS + WAKE_LEASE_MS / 1000
    future = hub.wake_wait(str(llm.id))  # subscribe first, then re-check: no lost outcome
    try:
        while True:
            current = await _reload(llm.name)
            if current is None or current.id != llm.id:
                raise ApiError(502, "llm_evicted", "the LLM was evicted")
            if current.status == "active":
                return loop.time() - started
            if current.status == "inactive":
                raise offline(f"The publisher of '{llm.name}' is offline.")
            epoch = await state.lease_acquire(key, hub.channel, WAKE_LEASE_MS)
            if epoch is not None:
                # A wake may have ended just before we took the lease: look again.
                current = await _reload(llm.name)
                if current is not None and current.status == "hibernating":
                    outcome = await asyncio.shield(hub.spawn(_lead_wake(current, key, epoch)))
                else:
                    await state.lease_release(key, epoch)
                    continue
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, "timeout", f"'{llm.name}' did not wake in time.")
                try:
                    outcome = await asyncio.wait_for(
                        asyncio.shield(future), min(WAKE_LEASE_MS / 1000, remaining)
                    )
                except TimeoutError:
                    continue  # the leader may have died: re-check the row and the lease
            if outcome.ok:
                return loop.time() - started
            raise outcome.error()
    finally:
        hub.wake_unwait(str(llm.id), future)


async def _lead_wake(llm: LlmRef, key: str, epoch: int) -> WakeOutcome:
    """Send the one wake task, wait for its answer, tell every waiter on every worker."""
    state = get_state()
    lost = False

    async def keep_lease() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(WAKE_LEASE_MS / 5000)
            if not await state.lease_refresh(key, epoch, WAKE_LEASE_MS):
                lost = True
                return

    keeper = asyncio.create_task(keep_lease())
    outcome = WakeOutcome(False, 502, "wake_failed", "wake failed")
    try:
        log.info("waking %s (lease epoch %d)", llm.name, epoch)
        pending = await dispatch(llm, {"kind": "wake", "llmName": llm.name})
        try:
            event = await next_event(pending, settings.MCPD_WAKE_TIMEOUT_SECONDS)
        except ApiError:
            await abandon(pending)
            raise
        await finish(pending)
        if event["kind"] == "result" and 200 <= int(event["status"]) < 300:
            if lost:
                outcome = WakeOutcome(False, 502, "wake_failed", "wake lease lost; retry")
            else:
                await sync_to_async(services.llm_mark_awake)(llm_id=llm.id, name=llm.name)
                outcome = WakeOutcome(True)
        elif event["kind"] == "result":
            outcome = WakeOutcome(False, 502, "wake_failed", _wake_message(result_body(event)))
        else:
            outcome = WakeOutcome(False, event["status"], event["code"], event["message"])
    except ApiError as exc:
        outcome = WakeOutcome(False, exc.status, exc.code, exc.message)
    except Exception as exc:
        log.exception("wake of %s failed", llm.name)
        outcome = WakeOutcome(False, 502, "wake_failed", f"wake failed: {exc}")
    finally:
        keeper.cancel()
        log.info("wake of %s: %s", llm.name, "ok" if outcome.ok else outcome.message)
        try:
            await events.broadcast(
                {
                    "type": "wake.outcome",
                    "llmId": str(llm.id),
                    "epoch": epoch,
                    "ok": outcome.ok,
                    "status": outcome.status,
                    "code": outcome.code,
                    "message": outcome.message,
                }
            )
        finally:
            await state.lease_release(key, epoch)
    return outcome

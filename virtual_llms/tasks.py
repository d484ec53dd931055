"""The requester's side of a task: open it and send its frame down the publisher's stream
(wherever that is held), wait for its events, and end it — finished, or abandoned with a
``cancel`` frame to the publisher. The publisher's side (its answers) is answers.py."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings

from . import events, rowcache
from .errors import ApiError, offline
from .hub import Hub, Pending, get_hub
from .models import Llm, LlmKind, LlmStatus
from .protocol import InferFrame, TaskEvent, TaskFrame, TaskPush
from .rowcache import Checked, LlmRef
from .state import CheckedOpen, Presence, get_state


def infer_frame(llm: LlmRef, body: dict[str, Any], streaming: bool, endpoint: str) -> InferFrame:
    """An infer task's frame (its taskId is set when it is opened)."""
    return {
        "kind": "infer",
        "taskId": "",
        "llmName": llm.name,
        "streaming": streaming,
        "endpoint": endpoint,
        "body": {**body, "model": llm.model},
    }


def _new_task(
    hub: Hub, llm: LlmRef, frame: TaskFrame, presence: Presence
) -> tuple[Pending, TaskPush, str]:
    """A new task of ``llm`` for the stream ``presence`` names: what this hub waits on, the
    hub message that carries its frame, and its record in the shared state (which starts
    with the requester's hub channel: the state reads it there)."""
    task_id = secrets.token_urlsafe(18)
    pending = Pending(
        task_id=task_id,
        llm_id=str(llm.id),
        session_id=llm.session_id,
        token_id=llm.token_id,
        holder=presence.channel,
        epoch=presence.epoch,
    )
    message: TaskPush = {
        "type": "task.push",
        "sid": llm.session_id,
        "epoch": presence.epoch,
        "hops": 0,
        "frame": cast(TaskFrame, {**frame, "taskId": task_id}),
        "reply": hub.channel,
        "tokenId": llm.token_id,
    }
    return pending, message, f"{hub.channel} {llm.session_id}"


async def dispatch(llm: LlmRef, frame: TaskFrame, presence: Presence | None = None) -> Pending:
    """Send a task frame down the stream of the LLM's session, wherever it is held (given,
    when it was just looked up with the row, or looked up now)."""
    hub = await get_hub()
    state = get_state()
    if presence is None:
        presence = await state.presence.lookup(llm.session_id)
    if presence is None:
        raise offline(f"The publisher of '{llm.name}' holds no control stream.")
    pending, message, record = _new_task(hub, llm, frame, presence)
    task_id = pending.task_id
    hub.pending[task_id] = pending
    try:
        remote = presence.channel != hub.channel
        payload = events.direct_payload(message) if remote else None
        if not await state.tasks.open(task_id, llm.token_id, record, presence.channel, payload):
            await hub.send(presence, message)
    except BaseException:
        hub.pending.pop(task_id, None)
        await state.tasks.take(task_id, llm.token_id)
        raise
    return pending


@dataclass(frozen=True)
class Opened:
    """open_cached's answer: the task sent (``pending``, for ``row``), or else what its
    round trip read for rowcache.llm_lookup (``checked``), or nothing to go on."""

    row: Llm | None = None
    pending: Pending | None = None
    checked: Checked | None = None


async def open_cached(name: str, body: dict[str, Any], streaming: bool, endpoint: str) -> Opened:
    """The common request in one round trip to the shared state: a virtual, active row cached
    here whose session's stream was held at the last lookup. The infer task is opened and
    sent to that stream's hub by one script, only if the row's stamps and the stream's holder
    are still those (state.dispatch.open_checked); otherwise nothing is sent, and the caller
    goes the long way (rowcache.llm_lookup with ``checked``, then dispatch)."""
    entry = rowcache.cached(name)
    if (
        entry is None
        or entry.presence is None
        or not entry.fresh()
        or entry.row.kind != LlmKind.VIRTUAL
        or entry.row.status != LlmStatus.ACTIVE
    ):
        return Opened()
    llm = rowcache.ref_of(entry.row)
    hub = await get_hub()
    presence = entry.presence
    pending, message, record = _new_task(
        hub, llm, infer_frame(llm, body, streaming, endpoint), presence
    )
    local = presence.channel == hub.channel
    payload = None if local else events.direct_payload(message)
    if payload is None and not local:
        return Opened()  # not the Redis pub/sub layer: nothing can be published from a script
    check = CheckedOpen(name, llm.session_id, entry.stamp, presence)
    state = get_state()
    hub.pending[pending.task_id] = pending
    try:
        stamp, now, opened = await state.dispatch.open_checked(
            check, pending.task_id, llm.token_id, record, payload
        )
    except BaseException:
        hub.pending.pop(pending.task_id, None)
        await state.tasks.take(pending.task_id, llm.token_id)
        raise
    if not opened:
        hub.pending.pop(pending.task_id, None)
        return Opened(checked=(stamp, now))
    if local:
        hub.route(message)
    return Opened(row=entry.row, pending=pending)


def silence_error() -> ApiError:
    timeout = settings.MCPD_INFER_TIMEOUT_SECONDS
    return ApiError(
        504, "timeout", f"The publisher sent nothing for {timeout:g} s; the task was cancelled."
    )


async def require_stream(llm: LlmRef) -> None:
    """503 at once if the LLM's publisher holds no control stream (nothing to wake)."""
    if await get_state().presence.lookup(llm.session_id) is None:
        raise offline(f"The publisher of '{llm.name}' holds no control stream.")


async def next_event(p: Pending, timeout: float) -> TaskEvent:
    """The task's next event, or ApiError 504 after ``timeout`` seconds of silence."""
    event = await next_event_or_none(p, timeout)
    if event is None:
        if timeout == settings.MCPD_INFER_TIMEOUT_SECONDS:
            raise silence_error()
        raise ApiError(504, "timeout", f"No answer within {timeout:g} s.")
    return event


async def next_event_or_none(p: Pending, timeout: float) -> TaskEvent | None:
    """The task's next event, or None after ``timeout`` seconds of silence."""
    try:
        async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per call
            event = await p.queue.get()
    except TimeoutError:
        return None
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
    if await state.tasks.take(p.task_id, p.token_id) is None:
        return  # it had already ended
    presence = await state.presence.lookup(p.session_id)
    if presence is not None:
        await hub.send(
            presence,
            {
                "type": "task.cancel",
                "sid": p.session_id,
                "epoch": presence.epoch,
                "taskId": p.task_id,
            },
        )

"""The requester's side of a task once it is sent: wait for its events, and end it —
finished, or abandoned with a ``cancel`` frame to the publisher. Infer tasks are sent by
routing.py (to the backend with a free slot); a wake task goes to the one session chosen to
wake (:func:`send_to_session`). The publisher's side (its answers) is answers.py."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, cast

from django.conf import settings

from . import events
from .errors import ApiError, offline
from .hub import Pending, get_hub
from .protocol import InferFrame, TaskEvent, TaskFrame, TaskPush
from .rowcache import LlmRef
from .state import get_state


def infer_frame(llm: LlmRef, body: dict[str, Any], streaming: bool, endpoint: str) -> InferFrame:
    """An infer task's frame (its taskId is set when it is sent)."""
    return {
        "kind": "infer",
        "taskId": "",
        "llmName": llm.name,
        "streaming": streaming,
        "endpoint": endpoint,
        "body": {**body, "model": llm.model},
    }


async def send_to_session(
    *, llm_id: str, name: str, session_id: str, token_id: int, frame: TaskFrame
) -> Pending:
    """Send a task frame down the stream of one session, wherever it is held; no slot is
    taken (a wake task). 503 if the session holds no stream."""
    hub = await get_hub()
    state = get_state()
    presence = await state.presence.lookup(session_id)
    if presence is None:
        raise offline(f"The publisher of '{name}' holds no control stream.")
    task_id = secrets.token_urlsafe(18)
    pending = Pending(task_id, llm_id, session_id, token_id, presence.channel, presence.epoch)
    pending.record = hub.channel
    message: TaskPush = {
        "type": "task.push",
        "sid": session_id,
        "epoch": presence.epoch,
        "hops": 0,
        "frame": cast(TaskFrame, {**frame, "taskId": task_id}),
        "reply": hub.channel,
        "tokenId": token_id,
    }
    hub.pending[task_id] = pending
    try:
        remote = presence.channel != hub.channel
        payload = events.direct_payload(message) if remote else None
        if not await state.tasks.open(task_id, token_id, hub.channel, presence.channel, payload):
            await hub.send(presence, message)
    except BaseException:
        hub.pending.pop(task_id, None)
        await state.tasks.take(task_id, token_id)
        raise
    return pending


def silence_error() -> ApiError:
    timeout = settings.MCPD_INFER_TIMEOUT_SECONDS
    return ApiError(
        504, "timeout", f"The publisher sent nothing for {timeout:g} s; the task was cancelled."
    )


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
    if event["kind"] != "failover":
        p.got_data = True
    return event


async def finish(p: Pending) -> None:
    """The task ended (its record was taken by whoever posted the last event)."""
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

"""Choose a backend for a task and send it there: the requester's side of
state/routing.py. Which backend gets it (the most free slots, ties at random, draining ones
never), the slot it takes and the frame's delivery happen in one round trip to the shared
state; this module builds the call and the local delivery."""

from __future__ import annotations

import random
import secrets
from typing import Any

from . import events
from .hub import Hub, Pending
from .protocol import InferFrame, TaskPush
from .rowcache import LlmRef
from .state import Routed, get_state


async def send(
    hub: Hub, llm: LlmRef, frame: InferFrame, waiter: str | None = None
) -> Pending | Routed:
    """Send an infer task of ``llm`` to one of its backends: the Pending task, or, when none
    took it, route()'s answer (``stale``, ``none`` or ``full``)."""
    candidates = llm.candidates()
    random.shuffle(candidates)  # ties go to a random one: the script takes the first best
    task_id = secrets.token_urlsafe(18)
    base: dict[str, Any] = {
        "type": "task.push",
        "hops": 0,
        "frame": {**frame, "taskId": task_id},
        "reply": hub.channel,
    }
    models = llm.models()
    if models:
        base["models"] = models
    # Waits for its events from the moment the frame may reach the publisher.
    pending = Pending(
        task_id=task_id, llm_id=str(llm.id), session_id="", token_id=0, holder="", epoch=""
    )
    hub.pending[task_id] = pending
    state = get_state()
    try:
        routed = await state.routing.route(
            name=llm.name,
            stamp=llm.stamp,
            llm_id=str(llm.id),
            task_id=task_id,
            reply=hub.channel,
            candidates=candidates,
            payload=events.splice_base(base),
            waiter=waiter,
        )
    except BaseException:
        hub.pending.pop(task_id, None)
        raise
    if routed.verdict != "sent":
        hub.pending.pop(task_id, None)
        return routed
    assert routed.candidate is not None
    assert routed.presence is not None
    pending.session_id = routed.candidate.sid
    pending.token_id = routed.candidate.token_id
    pending.holder, pending.epoch = routed.presence.channel, routed.presence.epoch
    pending.record = f"{hub.channel} {pending.llm_id} {pending.session_id}"
    # A pool's task may fail over to another backend; a one-backend row's fails as in v1.
    pending.spare = len(llm.backends) > 1
    if not routed.published:
        message: TaskPush = {
            **base,  # type: ignore[typeddict-item]  # base is a TaskPush less three keys
            "sid": pending.session_id,
            "epoch": pending.epoch,
            "tokenId": pending.token_id,
        }
        try:
            await hub.send(routed.presence, message)
        except BaseException:
            hub.pending.pop(task_id, None)
            await state.tasks.take(task_id, pending.token_id)
            raise
    return pending

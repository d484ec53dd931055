"""When Redis dropped this worker's pub/sub subscription and it was re-opened, fail the tasks
whose messages may have been lost meanwhile, at once and explicitly, instead of leaving their
calls to time out or their streams with a silent gap (issue 29).

What a lost subscription can have carried, and what becomes of it:
- an answer to a task this worker waits on: a stream that had relayed data ends with an
  error event (a chunk may be missing); a call whose task's record is gone (its last answer
  was taken by the publisher's post, and lost on its way) gets 503 ``state_unavailable``
  (``Retry-After``); a call whose task is still open waits on as ever;
- a task frame for a stream held here: every worker is told (``messages.lost``) and fails
  over, or fails with 503, its tasks on this worker's streams that were sent before the loss
  was noticed and have relayed nothing yet.
A Redis that restarted (or lost its keys) is recovery.py's: what this worker holds is
written back, and nothing is failed for a re-connect within RECOVERY_GRACE_SECONDS of it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from . import events
from .protocol import MessagesLost, error_event
from .runtime.channels_layer import SubscriptionWatch
from .state import get_state

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("mcpd.subscription")

RECOVERY_GRACE_SECONDS = 5.0
ANSWER_LOST = (
    503,
    "state_unavailable",
    "Redis dropped the broker's subscription and this task's answer was lost; retry.",
)
PART_LOST = (
    502,
    "publisher_disconnected",
    "Redis dropped the broker's subscription: part of this answer may be lost.",
)
FRAME_LOST = (
    503,
    "state_unavailable",
    "Redis dropped the subscription of the worker holding the publisher's stream: the task "
    "may not have reached it; retry.",
)


class Watch:
    """One hub's watch on its subscription (the hub's watch loop calls ``check``)."""

    def __init__(self) -> None:
        self._connections = SubscriptionWatch()
        self._seen = 0
        # When recovery.py last wrote back what this worker holds (time.monotonic()).
        self.recovered_at = -RECOVERY_GRACE_SECONDS

    async def check(self, hub: Hub) -> bool:
        """Whether a lost subscription was noticed (and its tasks failed) now."""
        self._connections.watch(events.layer())
        count = self._connections.reconnects
        if count == self._seen:
            return False
        self._seen = count
        if time.monotonic() - self.recovered_at < RECOVERY_GRACE_SECONDS:
            return False  # Redis restarted: recovery.py writes back what this worker holds
        log.warning(
            "Redis dropped this worker's channel-layer subscription (subscribed again): "
            "failing the tasks whose messages may be lost"
        )
        await lost_here(hub)
        await events.broadcast({"type": "messages.lost", "channel": hub.channel, "at": time.time()})
        return True


async def lost_here(hub: Hub) -> None:
    """Fail this worker's tasks whose answers may have been lost."""
    tasks = get_state().tasks
    for p in list(hub.pending.values()):
        if not p.session_id or not p.queue.empty():
            continue  # not routed yet, or it has an event to handle
        if p.got_data:
            if await tasks.take(p.task_id, p.token_id) is not None:
                p.queue.put_nowait(error_event(*PART_LOST))
        elif await tasks.get(p.task_id, p.token_id) is None and hub.pending.get(p.task_id) is p:
            p.queue.put_nowait(error_event(*ANSWER_LOST))


def on_messages_lost(hub: Hub, message: MessagesLost) -> None:
    """Another worker (or this one) lost its subscription: its streams' tasks sent before
    that, which have relayed nothing, fail over or fail."""
    for p in list(hub.pending.values()):
        if p.holder == message["channel"] and not p.got_data and p.sent <= message["at"]:
            hub.spawn(hub.lost(p, "the task's frame may be lost", FRAME_LOST))

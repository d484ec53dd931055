"""The per-LLM queue, on the requester's side: a request whose LLM's backends are all full
waits its turn, first in first out across every worker (state/routing.py keeps the order).

A waiter joins once, then tries again each time it is told that a slot may be free (a
``queue.ready`` notice through the channel layer, published by the script that freed the
slot), and at the latest every QUEUE_RECHECK_SECONDS, so a lost notice costs a short delay
and never a stuck request. It waits at most MCPD_QUEUE_TIMEOUT_SECONDS; a waiter that
leaves (its client went away, or it timed out) gives up its place at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable

from django.conf import settings

from . import events, routing
from .errors import ApiError
from .hub import Hub, Pending
from .protocol import InferFrame, QueueReady
from .rowcache import LlmRef
from .state import Routed, get_state

# A waiter that heard nothing tries again this often: the bound on what a lost notice costs.
QUEUE_RECHECK_SECONDS = 2.0
# Queue keys outlive the last join by the longest wait plus this much.
QUEUE_KEY_MARGIN_SECONDS = 60.0


def queue_full(llm: LlmRef) -> ApiError:
    limit = settings.MCPD_QUEUE_MAX
    return ApiError(
        503,
        "queue_full",
        f"{limit} requests already wait for '{llm.name}'; retry later.",
        headers={"Retry-After": "1"},
    )


def queue_timeout(llm: LlmRef, waited: float) -> ApiError:
    return ApiError(
        503,
        "queue_timeout",
        f"Every backend of '{llm.name}' stayed busy for {waited:.0f} s; retry later.",
        headers={"Retry-After": "5"},
    )


class Waiting:
    """One request's place in a queue, from join() to its task's dispatch or leave()."""

    def __init__(self, hub: Hub, llm: LlmRef) -> None:
        self.hub = hub
        self.llm_id = str(llm.id)
        self.id = secrets.token_urlsafe(12)
        self.joined = False
        self.position = 0
        self.notice = hub.queue_wait(self.id)

    async def join(self, llm: LlmRef) -> None:
        notice: QueueReady = {"type": "queue.ready", "llmId": self.llm_id, "waiter": self.id}
        position = await get_state().routing.join(
            llm_id=self.llm_id,
            waiter=self.id,
            channel=self.hub.channel,
            notice=notice,
            payload=events.direct_payload(notice),
            limit=settings.MCPD_QUEUE_MAX,
            ttl=settings.MCPD_QUEUE_TIMEOUT_SECONDS + QUEUE_KEY_MARGIN_SECONDS,
        )
        if position < 0:
            raise queue_full(llm)
        self.joined, self.position = True, position

    async def wait(self, timeout: float) -> None:
        """Until told a slot may be free, or ``timeout`` (at most the re-check interval)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.notice), min(timeout, QUEUE_RECHECK_SECONDS))
        if self.notice.done():
            self.notice = self.hub.queue_wait(self.id)

    async def leave(self) -> None:
        self.hub.queue_unwait(self.id)
        if self.joined:
            self.joined = False
            await get_state().routing.leave(llm_id=self.llm_id, waiter=self.id)


async def send_in_turn(
    hub: Hub,
    llm: LlmRef,
    frame: InferFrame,
    *,
    on_queued: Callable[[int], None] | None = None,
) -> Pending | Routed:
    """Send the task to a backend with a free slot, waiting in the LLM's queue while every
    backend is full: the Pending task, or route()'s answer when the row must be read again
    (``stale``) or no backend holds a stream (``none``). Raises 503 ``queue_full`` at once,
    ``queue_timeout`` after MCPD_QUEUE_TIMEOUT_SECONDS. ``on_queued`` hears the request's
    position each time it is known (0: next)."""
    sent = await routing.send(hub, llm, frame)
    if not isinstance(sent, Routed) or sent.verdict != "full":
        return sent
    waiting = Waiting(hub, llm)
    started = time.monotonic()
    deadline = started + settings.MCPD_QUEUE_TIMEOUT_SECONDS
    try:
        await waiting.join(llm)
        while True:
            if on_queued is not None:
                on_queued(waiting.position)
            # Right after joining too: a slot freed between the first try and the join
            # told nobody.
            sent = await routing.send(hub, llm, frame, waiting.id)
            if not isinstance(sent, Routed):
                waiting.joined = False  # the script that sent it took it out of the queue
                return sent
            if sent.verdict != "full":
                return sent
            waiting.position = sent.position
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise queue_timeout(llm, time.monotonic() - started)
            await waiting.wait(remaining)
    finally:
        await asyncio.shield(waiting.leave())

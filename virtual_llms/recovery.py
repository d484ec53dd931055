"""Recovery after Redis lost the shared state (a restart, a flush, a fail-over to an empty
replica): this worker writes back at once what it holds, so service returns within a beat
(WORKER_BEAT_SECONDS) instead of when each publisher happens to reconnect.

What is written back, only where nothing newer is (state/lua/reassert.lua): the presence of
every control stream bound here, the record of every task this worker waits on (so the
publisher's answers are still accepted, by any worker), this worker's share of each
backend's slot count (from those records), its liveness and its membership of the workers'
group. What is not: queue places (a waiter re-joins at its next re-check, queue.py) and the
row stamps (a lost stamp reads as a change, so row caches re-read their rows: rowcache.py).
Wake leases are re-created by their holder's next refresh (state/lua/lease_refresh.lua).
"""

from __future__ import annotations

import asyncio
import logging

from . import events
from .hub import Hub
from .state import get_state

log = logging.getLogger("mcpd.recovery")

# A write-back that fails (Redis went away again) is tried this often, this many times.
RETRY_SECONDS = 0.3
ATTEMPTS = 20


def log_outage(exc: BaseException) -> None:
    """The one line an outage logs (the beat thread sees it first; requests meanwhile answer
    503 state_unavailable without a traceback: errors.unavailable)."""
    log.warning("shared state unreachable: %s: %s", type(exc).__name__, exc or "no detail")


def log_back(seconds: float) -> None:
    log.warning("shared state reachable again after %.1f s", seconds)


async def reassert(hub: Hub) -> None:
    """Write back what this worker holds (see the module's docstring)."""
    state = get_state()
    streams = [(s.session_id, s.epoch) for s in hub.streams.values() if not s.closed]
    tasks = [
        (f"{p.task_id}:{p.token_id}", p.record)
        for p in hub.pending.values()
        if p.record and p.session_id
    ]
    for attempt in range(ATTEMPTS):
        try:
            # First the layer's subscriptions, so the tasks written back can be delivered.
            await events.resubscribe_dropped(force=True)
            await events.join_workers(hub.channel)
            if hub.draining:
                await state.presence.beat(hub.channel, draining=True)
            written = await state.presence.reassert(hub.channel, streams, tasks)
            break
        except Exception as exc:  # Redis came back and went again: try again shortly
            if attempt == ATTEMPTS - 1:
                log.warning(
                    "could not write back this worker's state: %s: %s", type(exc).__name__, exc
                )
                return
            await asyncio.sleep(RETRY_SECONDS)
    log.warning(
        "shared state was lost (Redis restarted or flushed): wrote back %d of %d stream(s) "
        "and %d of %d open task(s)",
        written[0],
        len(streams),
        written[1],
        len(tasks),
    )

"""subscription.py on Redis: when Redis drops this worker's pub/sub subscription (here: it is
killed by its address, as Redis does at its output-buffer limit), the tasks whose messages
may be lost fail at once and explicitly, and the subscription works again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from django.conf import settings

from virtual_llms import events, subscription
from virtual_llms.hub import Hub, Pending
from virtual_llms.protocol import error_event
from virtual_llms.runtime.channels_layer import _shards
from virtual_llms.state import get_state

pytestmark = pytest.mark.django_db(transaction=True)


def _pending(hub: Hub, task_id: str, *, holder: str, got_data: bool = False) -> Pending:
    p = Pending(task_id, "llm", "sid", 7, holder, "epoch")
    p.got_data = got_data
    p.record = hub.channel
    hub.pending[task_id] = p
    return p


async def _kill_subscription() -> None:
    """Cut this loop's subscriber connection off, as Redis does a client past its limit."""
    (shard,) = _shards(events.layer())
    connection = shard._pubsub.connection
    host, port = connection._writer.get_extra_info("sockname")[:2]
    killer = redis_asyncio.Redis.from_url(settings.REDIS_URL)
    try:
        assert await killer.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
    finally:
        await killer.aclose()


async def _event(p: Pending) -> dict[str, Any]:
    return dict(await asyncio.wait_for(p.queue.get(), 10))


async def test_a_dropped_subscription_fails_what_it_may_have_lost(hub: Hub) -> None:
    if not settings.REDIS_URL:
        pytest.skip("one process has no pub/sub subscription to lose")
    tasks = get_state().tasks
    other = await events.new_channel()  # another worker's hub, alive throughout

    async def beat() -> None:
        while True:
            await get_state().presence.beat(other)
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat())
    await asyncio.sleep(0.1)
    streaming = _pending(hub, "streaming", holder=other, got_data=True)
    answered = _pending(hub, "answered", holder=other)  # its record was taken: lost
    sent_here = _pending(hub, "sent-here", holder=hub.channel)  # its frame may be lost
    waiting = _pending(hub, "waiting", holder=other)  # open: its answer is to come
    for p in (streaming, sent_here, waiting):
        await tasks.put(p.task_id, p.token_id, p.record)
    hub.subscription.recovered_at = -60.0  # no Redis restart just now
    # The hub's watch has seen the connection (it registers on its first round).
    await asyncio.sleep(0.7)
    await _kill_subscription()

    assert await _event(streaming) == error_event(*subscription.PART_LOST)
    assert await _event(answered) == error_event(*subscription.ANSWER_LOST)
    assert await _event(sent_here) == error_event(*subscription.FRAME_LOST)
    assert waiting.queue.empty()
    assert await tasks.get("waiting", 7) == hub.channel
    for p in (streaming, sent_here):  # ended: a late answer finds no task
        assert await tasks.get(p.task_id, 7) is None
    # Subscribed again: messages reach the hub.
    waiting_event = {"kind": "result", "status": 200, "json": b"{}"}
    await events.send(
        hub.channel, {"type": "task.event", "taskId": "waiting", "event": waiting_event}
    )
    assert await _event(waiting) == waiting_event
    beating.cancel()
    await get_state().presence.gone(other)


async def test_a_reconnect_right_after_a_redis_restart_is_recoverys(hub: Hub) -> None:
    """Redis restarted: recovery.py writes back what this worker holds; nothing is failed."""
    if not settings.REDIS_URL:
        pytest.skip("one process has no pub/sub subscription to lose")
    waiting = _pending(hub, "w2", holder=hub.channel)
    await get_state().tasks.put("w2", 7, waiting.record)
    await asyncio.sleep(0.7)
    hub.subscription.recovered_at = time.monotonic()
    reconnects = hub.subscription._connections.reconnects
    await _kill_subscription()
    for _ in range(100):
        if hub.subscription._connections.reconnects > reconnects:
            break
        await asyncio.sleep(0.1)
    assert hub.subscription._connections.reconnects > reconnects
    await asyncio.sleep(0.7)  # the watch's next round has seen the reconnect
    assert waiting.queue.empty()

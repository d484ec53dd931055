"""Routing and the queue in the shared state (state/routing.py; lua/route.lua with Redis):
which backend gets a task, slots counted across workers and given back when a task ends,
the queue's order, and the frame published in the same round trip. The first run of the
suite checks the in-memory twin, the second Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.conf import settings

from virtual_llms import events, state
from virtual_llms.state import Candidate, Routed

LLM = ""


@pytest.fixture
async def shared() -> AsyncIterator[state.SharedState]:
    """The shared state, and a new LLM id (the Redis run shares its keys across tests)."""
    global LLM
    LLM = "llm-" + uuid.uuid4().hex[:8]
    yield state.get_state()
    await events.close_layer()


async def hub_channel(shared: state.SharedState) -> str:
    """A live worker's hub channel (with Redis: subscribed, so published frames arrive)."""
    channel = await events.new_channel() if settings.REDIS_URL else f"hub-{uuid.uuid4().hex}"
    await shared.presence.beat(channel)
    return channel


async def route(
    shared: state.SharedState,
    reply: str,
    candidates: list[Candidate],
    *,
    task: str | None = None,
    stamp: str | None = None,
    waiter: str | None = None,
    payload: bytes | None = None,
) -> Routed:
    return await shared.routing.route(
        name=LLM,
        stamp=await shared.routing.stamp(LLM) if stamp is None else stamp,
        llm_id=LLM,
        task_id=task or uuid.uuid4().hex,
        reply=reply,
        candidates=candidates,
        payload=payload,
        waiter=waiter,
    )


async def streams(shared: state.SharedState, holder: str, *sids: str) -> None:
    for sid in sids:
        await shared.presence.bind(sid, holder, f"e-{sid}")


async def test_the_backend_with_most_free_slots_gets_the_task(shared: state.SharedState) -> None:
    me = await hub_channel(shared)
    await streams(shared, me, "a", "b")
    pool = [Candidate("a", 1, 2), Candidate("b", 2, 2)]
    chosen = [(await route(shared, me, pool)).candidate for _ in range(4)]
    assert sorted(c.sid for c in chosen if c is not None) == ["a", "a", "b", "b"]
    assert await shared.slots.counts(LLM, ["a", "b"]) == {"a": 2, "b": 2}
    full = await route(shared, me, pool)
    assert (full.verdict, full.position) == ("full", 0)


async def test_without_limits_the_least_busy_wins_and_draining_is_never_chosen(
    shared: state.SharedState,
) -> None:
    me = await hub_channel(shared)
    await streams(shared, me, "a", "b", "c")
    pool = [Candidate("a", 1, None), Candidate("b", 1, None), Candidate("c", 1, 9, draining=True)]
    picks = [(await route(shared, me, pool)).candidate for _ in range(6)]
    assert sorted(p.sid for p in picks if p is not None) == ["a"] * 3 + ["b"] * 3
    only_draining = await route(shared, me, [Candidate("c", 1, 9, draining=True)])
    assert only_draining.verdict == "full"  # live, but it takes nothing new


async def test_no_stream_no_task_and_a_stale_stamp_sends_nothing(
    shared: state.SharedState,
) -> None:
    me = await hub_channel(shared)
    assert (await route(shared, me, [Candidate("nobody", 1, None)])).verdict == "none"
    await streams(shared, me, "a")
    old = await shared.routing.stamp(LLM)
    await asyncio.to_thread(shared.stamps.touch, [state.name_field(LLM)])
    stale = await route(shared, me, [Candidate("a", 1, None)], stamp=old, task="t-stale")
    assert stale.verdict == "stale"
    assert stale.stamp == await shared.routing.stamp(LLM)
    assert await shared.tasks.take("t-stale", 1) is None  # no record, no slot
    assert await shared.slots.counts(LLM, ["a"]) == {"a": 0}


async def test_a_taken_task_gives_its_slot_back_once(shared: state.SharedState) -> None:
    me = await hub_channel(shared)
    await streams(shared, me, "a")
    sent = await route(shared, me, [Candidate("a", 5, 1)], task="t1")
    assert sent.verdict == "sent"
    assert (await route(shared, me, [Candidate("a", 5, 1)])).verdict == "full"
    assert await shared.tasks.get("t1", 5) is not None  # a chunk: the slot stays taken
    assert await shared.slots.counts(LLM, ["a"]) == {"a": 1}
    assert await shared.tasks.take("t1", 5) is not None
    assert await shared.tasks.take("t1", 5) is None
    assert await shared.slots.counts(LLM, ["a"]) == {"a": 0}
    assert (await route(shared, me, [Candidate("a", 5, 1)])).verdict == "sent"


async def test_waiters_come_first_in_order_and_the_head_hears_of_a_free_slot(
    shared: state.SharedState,
) -> None:
    me = await hub_channel(shared)
    await streams(shared, me, "a")
    pool = [Candidate("a", 1, 1)]
    assert (await route(shared, me, pool, task="busy")).verdict == "sent"
    heard: list[str] = []
    shared.routing.on_notice(lambda channel, notice: heard.append(notice["waiter"]))
    for waiter in ("w1", "w2"):
        notice = {"type": "queue.ready", "llmId": LLM, "waiter": waiter}
        position = await shared.routing.join(
            llm_id=LLM,
            waiter=waiter,
            channel=me,
            notice=notice,
            payload=events.direct_payload(notice),
            limit=2,
            ttl=30,
        )
        assert position == ["w1", "w2"].index(waiter)
    assert (
        await shared.routing.join(
            llm_id=LLM, waiter="w3", channel=me, notice={}, payload=None, limit=2, ttl=30
        )
        == -1
    )  # the queue is full
    assert await shared.tasks.take("busy", 1) is not None  # a slot frees: w1 hears of it
    if settings.REDIS_URL:
        notice = await asyncio.wait_for(events.receive(me), 5)
        heard.append(notice["waiter"])
    assert heard == ["w1"]
    # A newcomer does not jump the queue; the second waiter neither; the head gets it.
    assert (await route(shared, me, pool)).verdict == "full"
    assert (await route(shared, me, pool, waiter="w2")).position == 1
    assert (await route(shared, me, pool, waiter="w1")).verdict == "sent"
    assert await shared.routing.position(llm_id=LLM, waiter="w2") == 0
    await shared.routing.leave(llm_id=LLM, waiter="w2")
    assert await shared.routing.position(llm_id=LLM, waiter="w2") == -1
    assert shared.routing.depths_sync([LLM]) == {LLM: 0}


async def test_a_dead_workers_slots_free_themselves(shared: state.SharedState) -> None:
    if not settings.REDIS_URL:
        pytest.skip("one process: no other worker can die")
    me = await hub_channel(shared)
    other = await hub_channel(shared)
    await streams(shared, me, "a")
    assert (await route(shared, other, [Candidate("a", 1, 1)])).verdict == "sent"
    assert (await route(shared, me, [Candidate("a", 1, 1)])).verdict == "full"
    await shared.presence.gone(other)  # kill -9: its liveness key goes
    assert (await route(shared, me, [Candidate("a", 1, 1)])).verdict == "sent"


async def test_the_frame_is_published_to_the_chosen_hub_with_its_backend_spliced_in(
    shared: state.SharedState,
) -> None:
    if not settings.REDIS_URL:
        pytest.skip("the in-memory layer publishes nothing: the hub sends it")
    me = await hub_channel(shared)
    holder = await hub_channel(shared)
    await streams(shared, holder, "b")
    base: dict[str, Any] = {
        "type": "task.push",
        "hops": 0,
        "frame": {"kind": "infer", "taskId": "t9", "body": {"x": [1, 2.5, "é"]}},
        "reply": me,
        "models": {"b": "other-model"},
    }
    payload = events.splice_base(base)
    assert payload is not None
    sent = await route(shared, me, [Candidate("b", 42, None)], task="t9", payload=payload)
    assert (sent.verdict, sent.published) == ("sent", True)
    message = await asyncio.wait_for(events.receive(holder), 5)
    assert message == {**base, "sid": "b", "epoch": "e-b", "tokenId": 42}
    assert await shared.tasks.take("t9", 42) == f"{me} {LLM} b"

"""The shared state's task records, and (with Redis) the scripts that publish a task's frame or
event in the same round trip as its record (tasks.open, tasks.take/get with a payload from
events.direct_payload); routing is tests/test_routing.py. The first run of the suite has the
in-memory layer, where there is nothing to publish to; the second has Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.conf import settings

from virtual_llms import events, state
from virtual_llms import hub as hub_mod


async def test_direct_payload_only_with_the_redis_pubsub_layer() -> None:
    message = {"type": "task.event", "taskId": "t", "event": {"kind": "result"}}
    payload = events.direct_payload(message)
    if settings.REDIS_URL:
        assert payload is not None
        assert events.layer().deserialize(payload) == message
    else:
        assert payload is None
        # Nothing to publish to: the record is opened and the caller sends the frame itself.
        tasks = state.get_state().tasks
        assert not await tasks.open("t", 1, "r s", "ch", b"x")
        assert await tasks.take("t", 1) == "r s"


async def test_a_task_opened_and_taken_publishes_in_the_same_call() -> None:
    if not settings.REDIS_URL:
        pytest.skip("the in-memory layer has no Redis channels (the test above checks that)")
    shared = state.get_state()
    holder = await events.new_channel()
    requester = await events.new_channel()
    await shared.presence.beat(requester)
    try:
        push = {"type": "task.push", "sid": "s", "frame": {"taskId": "t1"}}
        payload = events.direct_payload(push)
        assert payload is not None
        await shared.tasks.open("t1", 7, f"{requester} s", holder, payload)
        assert await asyncio.wait_for(events.receive(holder), 5) == push

        first = {"type": "task.event", "taskId": "t1", "event": {"kind": "chunks"}}
        last = {"type": "task.event", "taskId": "t1", "event": {"kind": "result"}}
        assert await shared.tasks.get("t1", 8, events.direct_payload(first)) is None  # not its
        assert await shared.tasks.get("t1", 7, events.direct_payload(first)) == f"{requester} s"
        assert await shared.tasks.take("t1", 7, events.direct_payload(last)) == f"{requester} s"
        assert await asyncio.wait_for(events.receive(requester), 5) == first
        assert await asyncio.wait_for(events.receive(requester), 5) == last
        # Taken once: a late answer finds nothing and publishes nothing.
        assert await shared.tasks.take("t1", 7, events.direct_payload(last)) is None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(events.receive(requester), 0.3)
    finally:
        await shared.presence.gone(requester)
        await events.close_layer()


async def test_a_busy_loop_stays_alive_to_other_workers_and_a_stuck_one_is_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The liveness key is refreshed from a thread while the event loop ticks: a loop held up
    for longer than the key lives (a full machine) is not taken for a dead worker; one that
    stopped ticking for LOOP_STALL_SECONDS is."""
    if not settings.REDIS_URL:
        pytest.skip("liveness keys are shared through Redis; one process needs none")

    hub = hub_mod.Hub()
    await hub.start()
    shared = state.get_state()
    ttl = state.WORKER_TTL_MS / 1000
    try:
        time.sleep(2 * ttl)  # noqa: ASYNC251 - blocks the loop on purpose: nothing on it can beat
        assert await shared.presence.live([hub.channel]) == {hub.channel}

        monkeypatch.setattr(hub_mod, "LOOP_STALL_SECONDS", 0.5)
        time.sleep(0.5 + 2 * ttl)  # noqa: ASYNC251 - the same, past LOOP_STALL_SECONDS
        assert await shared.presence.live([hub.channel]) == set()

        await asyncio.sleep(3 * state.WORKER_BEAT_SECONDS)  # the loop ticks again
        assert await shared.presence.live([hub.channel]) == {hub.channel}
    finally:
        await hub.stop()
    assert hub._beat_thread is not None
    assert not hub._beat_thread.is_alive()
    assert await shared.presence.live([hub.channel]) == set()
    await shared.aclose()


async def test_a_wake_failure_reaches_a_request_that_arrived_before_it_but_not_after() -> None:
    """Issue 26: leases.join gives a request the failure of a wake decided after the request
    arrived, even if it never joined that wake's epoch; a request that arrives after the
    failure takes the lease and wakes again (the contract's "the next request wakes again")."""
    leases = state.get_state().leases
    key = f"wake:test-{time.monotonic_ns()}"
    before_ms = int(time.time() * 1000) - 50
    lead = await leases.join(key, "hub-a", 5000, 0, before_ms)
    assert lead.kind == "lead"
    assert (await leases.join(key, "hub-b", 5000, 0, before_ms)).kind == "running"
    decided = int(time.time() * 1000)
    await leases.end(key, lead.epoch, f"0 502 wake_failed {decided} GPU on fire", 30, 0)
    late_joiner = await leases.join(key, "hub-b", 5000, 0, before_ms)
    assert late_joiner.kind == "outcome"
    assert late_joiner.record.endswith("GPU on fire")
    after = await leases.join(key, "hub-c", 5000, 0, decided + 1)
    assert after.kind == "lead"
    assert after.epoch == lead.epoch + 1
    await leases.release(key, after.epoch)


async def test_a_big_message_rides_a_blob_and_arrives_whole(settings: object) -> None:
    """spill.py: over MCPD_PUBSUB_INLINE_BYTES a message is not published as it is (on
    Redis: a reference to a blob, taken once by its receiver); with either layer it arrives
    whole, and no blob is left."""
    settings.MCPD_PUBSUB_INLINE_BYTES = 1024  # type: ignore[attr-defined]
    shared = state.get_state()
    channel = await events.new_channel()
    try:
        big = {
            "type": "task.event",
            "taskId": "t",
            "event": {"kind": "result", "json": b"x" * 5000},
        }
        small = {"type": "task.event", "taskId": "t", "event": {"kind": "chunks", "chunks": []}}
        assert events.direct_payload(big) is None  # never published by a script whole
        assert (events.direct_payload(small) is None) == (not settings.REDIS_URL)  # type: ignore[attr-defined]
        await events.send(channel, big)
        await events.send(channel, small)
        assert await asyncio.wait_for(events.receive(channel), 5) == big
        assert await asyncio.wait_for(events.receive(channel), 5) == small
        if shared.conn is not None:
            client = shared.conn.client()
            assert [k async for k in client.scan_iter(match=shared.conn.key("spill", "*"))] == []
        # A blob that is gone (expired) is skipped, not handed on as a reference.
        blob = await shared.blobs.put(b"whatever")
        assert await shared.blobs.take(blob) == b"whatever"
        assert await shared.blobs.take(blob) is None
    finally:
        await events.close_layer()

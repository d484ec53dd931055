"""The task lifecycle, in process: the original VirtualLlmService's enqueue / complete / chunk /
fail / unbind cases and its four v2 wake cases, one test each, named after them.

A bound control stream (binding.stream_open) plays the original tests' fakeSession: the frames
it would send to the publisher are read from its queue. The first run of the suite uses the
in-memory layer and state; the second uses Redis for both."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from virtual_llms import answers, binding, inference, rowcache, tasks
from virtual_llms import hub as hub_mod
from virtual_llms.auth import token_create
from virtual_llms.errors import ApiError
from virtual_llms.models import ApiToken, Llm, LlmKind, LlmStatus, ProviderSession


async def next_ev(pending: hub_mod.Pending, timeout: float = 5.0) -> dict[str, Any]:
    """The task's next event, as a plain dict (its keys checked by the assertions)."""
    return dict(await tasks.next_event(pending, timeout))


pytestmark = [pytest.mark.django_db(transaction=True)]

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@sync_to_async
def make_row(name: str = "vllm-local", status: str = "active", **fields: Any) -> ApiToken:
    token, _ = token_create(role="publisher", label="pub")
    ProviderSession.objects.create(pk="sess", token=token)
    Llm.objects.create(
        name=name,
        type="openai",
        model="m",
        kind=LlmKind.VIRTUAL,
        provider_session_id="sess",
        publisher_token=token,
        status=status,
        last_heartbeat_at=timezone.now(),
        inactive_since=timezone.now() if status == "inactive" else None,
        **fields,
    )
    return token


@sync_to_async
def row_status(name: str) -> str:
    return Llm.objects.get(name=name).status


async def bind(session_id: str, token_id: int) -> hub_mod.ControlStream:
    """Open a control stream for the session, as the SSE view or the socket does."""
    stream = hub_mod.ControlStream(session_id, token_id)
    await binding.stream_open(stream)
    return stream


async def next_frame(stream: hub_mod.ControlStream, timeout: float = 5.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(stream.queue.get(), timeout)
    assert frame is not None, "the stream was closed"
    return dict(frame)


async def no_frame(stream: hub_mod.ControlStream, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(stream.queue.get(), wait)


async def enqueue(
    name: str, body: dict[str, Any] = BODY, streaming: bool = False
) -> hub_mod.Pending:
    pending, _ = await inference.enqueue_infer(await rowcache.load_virtual(name), body, streaming)
    return pending


# --- the original cases ------------------------------------------------------------------------


async def test_enqueue_infer_task_pushes_a_task_frame_to_the_sse_session(hub: hub_mod.Hub) -> None:
    token = await make_row()
    session = await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    frame = await next_frame(session)
    assert frame["kind"] == "infer"
    assert frame["taskId"] == pending.task_id
    assert frame["llmName"] == "vllm-local"
    assert frame["streaming"] is False
    assert frame["body"] == BODY
    await no_frame(session)


async def test_enqueue_infer_task_rejects_when_the_publisher_is_offline_no_session_bound(
    hub: hub_mod.Hub,
) -> None:
    await make_row()
    with pytest.raises(ApiError, match=r"publisher|no control stream") as exc:
        await enqueue("vllm-local")
    assert exc.value.status == 503
    assert exc.value.code == "publisher_offline"


async def test_enqueue_infer_task_rejects_when_the_row_is_inactive(hub: hub_mod.Hub) -> None:
    token = await make_row(status="inactive")
    session = await bind("sess", token.pk)
    with pytest.raises(ApiError, match=r"inactive|publisher offline") as exc:
        await enqueue("vllm-local")
    assert exc.value.status == 503
    await no_frame(session)


async def test_enqueue_infer_task_rejects_when_the_llm_is_public_not_virtual(
    hub: hub_mod.Hub,
) -> None:
    await sync_to_async(Llm.objects.create)(
        name="qwen3-thinking", type="openai", model="m", kind="public", url="http://x/v1"
    )
    with pytest.raises(ApiError, match="not a virtual provider"):
        await enqueue("qwen3-thinking")


async def test_complete_task_resolves_the_pending_non_streaming_promise(hub: hub_mod.Hub) -> None:
    token = await make_row()
    await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    assert await answers.post_result(
        token_id=token.pk, task_id=pending.task_id, status=200, body={"ok": True}
    )
    event = await next_ev(pending, 5)
    assert (event["kind"], event["status"]) == ("result", 200)
    assert answers.result_body(event) == {"ok": True}
    # Accepted once: a second result for the same task is refused.
    assert not await answers.post_result(
        token_id=token.pk, task_id=pending.task_id, status=200, body={}
    )


async def test_streaming_push_task_chunk_fans_chunks_to_subscribers_done_resolves_the_ref(
    hub: hub_mod.Hub,
) -> None:
    token = await make_row()
    session = await bind("sess", token.pk)
    pending = await enqueue("vllm-local", {**BODY, "stream": True}, streaming=True)
    assert (await next_frame(session))["streaming"] is True
    got: list[str] = []
    for chunk in ({"data": "hello"}, {"data": " world"}, {"data": "[DONE]", "done": True}):
        assert await answers.post_chunks(
            token_id=token.pk,
            task_id=pending.task_id,
            chunks=[{"data": str(chunk["data"]), "done": bool(chunk.get("done", False))}],
        )
        event = await next_ev(pending, 5)
        got.extend(c["data"] for c in event["chunks"])
    assert got == ["hello", " world", "[DONE]"]
    # done ended the task: nothing more is accepted for it.
    assert not await answers.post_chunks(
        token_id=token.pk, task_id=pending.task_id, chunks=[{"data": "late", "done": False}]
    )


async def test_fail_task_rejects_the_pending_promise_with_a_clear_error(hub: hub_mod.Hub) -> None:
    token = await make_row()
    await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    assert await answers.post_error(
        token_id=token.pk, task_id=pending.task_id, message="upstream blew up"
    )
    event = await next_ev(pending, 5)
    assert event["kind"] == "error"
    assert event["status"] == 502
    assert "upstream blew up" in event["message"]


async def test_unbind_session_rejects_in_flight_tasks_for_that_session(hub: hub_mod.Hub) -> None:
    token = await make_row()
    session = await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    await binding.stream_close(session)
    event = await next_ev(pending, 5)
    assert event["kind"] == "error"
    assert event["code"] == "publisher_disconnected"
    assert "publisher disconnected" in event["message"]
    assert await row_status("vllm-local") == "inactive"
    # The late result of the failed task is refused.
    assert not await answers.post_result(
        token_id=token.pk, task_id=pending.task_id, status=200, body={}
    )


# --- v2: wake before infer -----------------------------------------------------------------------


async def test_hibernating_dispatches_a_wake_task_first_and_waits_for_it_to_complete_before_infer(
    hub: hub_mod.Hub,
) -> None:
    token = await make_row("sleeping", status=LlmStatus.HIBERNATING)
    session = await bind("sess", token.pk)
    infer = asyncio.create_task(enqueue("sleeping"))
    wake = await next_frame(session)
    assert wake["kind"] == "wake"
    assert wake["llmName"] == "sleeping"
    await no_frame(session)  # no infer before the wake is confirmed
    assert not infer.done()
    assert await answers.post_result(
        token_id=token.pk, task_id=wake["taskId"], status=200, body={"ok": True}
    )
    pending = await asyncio.wait_for(infer, 5)
    frame = await next_frame(session)
    assert frame["kind"] == "infer"
    assert frame["taskId"] == pending.task_id
    assert await row_status("sleeping") == "active"


async def test_hibernating_concurrent_infer_requests_share_a_single_wake_task(
    hub: hub_mod.Hub,
) -> None:
    token = await make_row("sleeping", status=LlmStatus.HIBERNATING)
    session = await bind("sess", token.pk)
    requests = [asyncio.create_task(enqueue("sleeping")) for _ in range(3)]
    wake = await next_frame(session)
    assert wake["kind"] == "wake"
    await no_frame(session, 0.5)  # exactly one wake, however many wait
    assert await answers.post_result(
        token_id=token.pk, task_id=wake["taskId"], status=200, body={"ok": True}
    )
    pendings = await asyncio.wait_for(asyncio.gather(*requests), 10)
    frames = [await next_frame(session) for _ in range(3)]
    assert [f["kind"] for f in frames] == ["infer"] * 3
    assert sorted(f["taskId"] for f in frames) == sorted(p.task_id for p in pendings)
    await no_frame(session)


async def test_hibernating_rejects_when_the_wake_task_fails(hub: hub_mod.Hub) -> None:
    token = await make_row("broken", status=LlmStatus.HIBERNATING)
    session = await bind("sess", token.pk)
    infer = asyncio.create_task(enqueue("broken"))
    wake = await next_frame(session)
    assert await answers.post_error(
        token_id=token.pk, task_id=wake["taskId"], message="wake recipe failed"
    )
    with pytest.raises(ApiError, match="wake recipe failed") as exc:
        await asyncio.wait_for(infer, 5)
    assert exc.value.status == 502
    # The row stayed hibernating: the next request gets another wake try. Arrival and
    # decision times are in milliseconds, and a request that arrives in the millisecond the
    # failure was decided counts as one that waited for it (leases.py): "next" is later.
    assert await row_status("broken") == "hibernating"
    await asyncio.sleep(0.002)
    retry = asyncio.create_task(enqueue("broken"))
    assert (await next_frame(session))["kind"] == "wake"
    retry.cancel()


async def test_inactive_still_rejects_with_503_publisher_offline_wake_path_only_fires_for_hibernating(  # noqa: E501 - the original case's name
    hub: hub_mod.Hub,
) -> None:
    token = await make_row("gone", status=LlmStatus.INACTIVE)
    session = await bind("sess", token.pk)
    with pytest.raises(ApiError, match=r"inactive|publisher offline") as exc:
        await enqueue("gone")
    assert exc.value.status == 503
    await no_frame(session)


# --- beyond the original ---------------------------------------------------------------


async def test_results_from_another_token_are_refused_and_change_nothing(hub: hub_mod.Hub) -> None:
    token = await make_row()
    other, _ = await sync_to_async(token_create)(role="publisher", label="other")
    await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    assert not await answers.post_result(
        token_id=other.pk, task_id=pending.task_id, status=200, body={"spoofed": True}
    )
    assert not await answers.post_error(token_id=other.pk, task_id=pending.task_id, message="x")
    assert await answers.post_result(
        token_id=token.pk, task_id=pending.task_id, status=200, body={"real": True}
    )
    assert answers.result_body(await next_ev(pending, 5)) == {"real": True}


async def test_abandon_sends_cancel_and_later_results_are_refused(hub: hub_mod.Hub) -> None:
    token = await make_row()
    session = await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    await next_frame(session)
    await tasks.abandon(pending)
    cancel = await next_frame(session)
    assert cancel == {"kind": "cancel", "taskId": pending.task_id}
    assert not await answers.post_result(
        token_id=token.pk, task_id=pending.task_id, status=200, body={}
    )


async def test_a_second_stream_replaces_the_first_without_unbinding(hub: hub_mod.Hub) -> None:
    token = await make_row()
    first = await bind("sess", token.pk)
    second = await bind("sess", token.pk)
    assert await asyncio.wait_for(first.queue.get(), 2) is None  # the old one is closed
    await binding.stream_close(first)  # its closing must not unbind the new one
    assert await row_status("vllm-local") == "active"
    pending = await enqueue("vllm-local")
    assert (await next_frame(second))["taskId"] == pending.task_id


async def test_next_event_times_out_with_504(hub: hub_mod.Hub) -> None:
    token = await make_row()
    await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    with pytest.raises(ApiError) as exc:
        await next_ev(pending, 0.2)
    assert exc.value.status == 504


async def test_evicting_an_llm_fails_its_tasks_in_flight(hub: hub_mod.Hub) -> None:
    token = await make_row()
    await bind("sess", token.pk)
    pending = await enqueue("vllm-local")
    from virtual_llms import services

    row = await sync_to_async(Llm.objects.get)(name="vllm-local")
    await sync_to_async(services.llm_evict)(llm=row)
    event = await next_ev(pending, 5)
    assert event["code"] == "llm_evicted"
    assert event["status"] == 502


async def test_token_revoked_broadcast_closes_its_streams_and_forgets_the_token(
    hub: hub_mod.Hub,
) -> None:
    from virtual_llms import auth, events

    token, plaintext = await sync_to_async(token_create)(role="publisher", label="p")
    await sync_to_async(ProviderSession.objects.create)(pk="sess", token=token)
    assert (await auth.aauthenticate(f"Bearer {plaintext}", ["publisher"])).pk == token.pk
    session = await bind("sess", token.pk)
    # Revoked behind the cache's back (another worker wrote the row): still cached here ...
    await sync_to_async(ApiToken.objects.filter(pk=token.pk).update)(revoked_at=timezone.now())
    assert (await auth.aauthenticate(f"Bearer {plaintext}", ["publisher"])).pk == token.pk
    # ... until the broadcast arrives, which clears the cache and closes the stream.
    await events.broadcast({"type": "token.revoked", "tokenId": token.pk})
    assert await asyncio.wait_for(session.queue.get(), 5) is None
    with pytest.raises(ApiError) as exc:
        await auth.aauthenticate(f"Bearer {plaintext}", ["publisher"])
    assert exc.value.status == 401


async def test_a_revocation_whose_broadcast_is_lost_still_takes_effect_within_a_second(
    hub: hub_mod.Hub,
) -> None:
    """Issue 25: a Redis restart loses broadcasts; the database still says revoked."""
    from virtual_llms import auth

    token, plaintext = await sync_to_async(token_create)(role="publisher", label="p")
    await sync_to_async(ProviderSession.objects.create)(pk="sess", token=token)
    assert (await auth.aauthenticate(f"Bearer {plaintext}", ["publisher"])).pk == token.pk
    session = await bind("sess", token.pk)
    revoked_at = time.monotonic()
    # Revoked in the database only: no token.revoked broadcast reaches this worker.
    await sync_to_async(ApiToken.objects.filter(pk=token.pk).update)(revoked_at=timezone.now())
    assert await asyncio.wait_for(session.queue.get(), 5) is None  # the stream closed
    # The bounds are 0.5 s (revocation.py) and 1 s (the token cache); the slack is a loaded
    # CI host's. Without the mechanism neither would happen at all.
    assert time.monotonic() - revoked_at < 2.0
    await asyncio.sleep(max(0.0, auth.AUTH_CACHE_SECONDS - (time.monotonic() - revoked_at)))
    with pytest.raises(ApiError) as exc:
        await auth.aauthenticate(f"Bearer {plaintext}", ["publisher"])
    assert exc.value.status == 401
    assert time.monotonic() - revoked_at < 3.0

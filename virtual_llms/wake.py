"""Wake before infer: a hibernating LLM is woken once across all workers, however many
requests wait. One request holds the wake lease (state/leases.py) and sends the one wake
task; every other waiter, on any worker, waits for the outcome it broadcasts."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from . import events, rowcache, services
from .answers import result_body
from .errors import ApiError, offline
from .hub import WakeOutcome, get_hub
from .rowcache import LlmRef
from .state import get_state
from .tasks import abandon, dispatch, finish, next_event

log = logging.getLogger("mcpd.wake")

# A wake lease lives this long unless its leader refreshes it (every WAKE_LEASE_MS / 5):
# a leader killed with SIGKILL delays the next wake by at most this much.
WAKE_LEASE_MS = 5000


def _wake_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return f"wake failed: {json.dumps(body)[:500]}"


async def ensure_awake(llm: LlmRef) -> float:
    """Wait until a hibernating LLM is awake, waking it if nobody else is: one wake per LLM
    across all workers. Returns the seconds waited. Raises ApiError for every failure."""
    hub = await get_hub()
    leases = get_state().leases
    key = f"wake:{llm.id}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + settings.MCPD_WAKE_TIMEOUT_SECONDS + WAKE_LEASE_MS / 1000
    future = hub.wake_wait(str(llm.id))  # subscribe first, then re-check: no lost outcome
    try:
        while True:
            current = await rowcache.reload(llm.name)
            if current is None or current.id != llm.id:
                raise ApiError(502, "llm_evicted", "the LLM was evicted")
            if current.status == "active":
                return loop.time() - started
            if current.status == "inactive":
                raise offline(f"The publisher of '{llm.name}' is offline.")
            epoch = await leases.acquire(key, hub.channel, WAKE_LEASE_MS)
            if epoch is not None:
                # A wake may have ended just before we took the lease: look again.
                current = await rowcache.reload(llm.name)
                if current is not None and current.status == "hibernating":
                    outcome = await asyncio.shield(hub.spawn(_lead_wake(current, key, epoch)))
                else:
                    await leases.release(key, epoch)
                    continue
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, "timeout", f"'{llm.name}' did not wake in time.")
                try:
                    outcome = await asyncio.wait_for(
                        asyncio.shield(future), min(WAKE_LEASE_MS / 1000, remaining)
                    )
                except TimeoutError:
                    continue  # the leader may have died: re-check the row and the lease
            if outcome.ok:
                return loop.time() - started
            raise outcome.error()
    finally:
        hub.wake_unwait(str(llm.id), future)


async def _lead_wake(llm: LlmRef, key: str, epoch: int) -> WakeOutcome:
    """Send the one wake task, wait for its answer, tell every waiter on every worker."""
    leases = get_state().leases
    lost = False

    async def keep_lease() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(WAKE_LEASE_MS / 5000)
            if not await leases.refresh(key, epoch, WAKE_LEASE_MS):
                lost = True
                return

    keeper = asyncio.create_task(keep_lease())
    outcome = WakeOutcome(False, 502, "wake_failed", "wake failed")
    try:
        log.info("waking %s (lease epoch %d)", llm.name, epoch)
        pending = await dispatch(llm, {"kind": "wake", "taskId": "", "llmName": llm.name})
        try:
            event = await next_event(pending, settings.MCPD_WAKE_TIMEOUT_SECONDS)
        except ApiError:
            await abandon(pending)
            raise
        await finish(pending)
        if event["kind"] == "result" and 200 <= event["status"] < 300:
            if lost:
                outcome = WakeOutcome(False, 502, "wake_failed", "wake lease lost; retry")
            else:
                await sync_to_async(services.llm_mark_awake)(llm_id=llm.id, name=llm.name)
                outcome = WakeOutcome(True)
        elif event["kind"] == "result":
            outcome = WakeOutcome(False, 502, "wake_failed", _wake_message(result_body(event)))
        elif event["kind"] == "error":
            outcome = WakeOutcome(False, event["status"], event["code"], event["message"])
        else:
            outcome = WakeOutcome(False, 502, "wake_failed", "the publisher streamed a wake")
    except ApiError as exc:
        outcome = WakeOutcome(False, exc.status, exc.code, exc.message)
    except Exception as exc:
        log.exception("wake of %s failed", llm.name)
        outcome = WakeOutcome(False, 502, "wake_failed", f"wake failed: {exc}")
    finally:
        keeper.cancel()
        log.info("wake of %s: %s", llm.name, "ok" if outcome.ok else outcome.message)
        try:
            await events.broadcast(
                {
                    "type": "wake.outcome",
                    "llmId": str(llm.id),
                    "epoch": epoch,
                    "ok": outcome.ok,
                    "status": outcome.status,
                    "code": outcome.code,
                    "message": outcome.message,
                }
            )
        finally:
            await leases.release(key, epoch)
    return outcome

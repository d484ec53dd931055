"""Wake before infer: a hibernating LLM is woken once across all workers, however many
requests wait on however many workers. One request takes the wake lease (state/leases.py)
and sends the one wake task, to the hibernating backend with the most slots that holds a
stream; every other waiter joins that lease's epoch and waits for the outcome the leader
broadcasts. The leader records the outcome as it releases the lease, so a waiter that
missed the broadcast reads it after the fact. As the contract says, the next request after
a failed wake wakes again; with MCPD_WAKE_FAILURE_SECONDS set, a failure is remembered that
long instead, and requests in that time get its 502 at once (with ``Retry-After``), so
clients that retry do not wake a broken model again and again."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from . import events, observers, rowcache, services
from .answers import result_body
from .errors import ApiError, offline
from .hub import WakeOutcome, get_hub
from .models import LlmStatus
from .rowcache import BackendRef, LlmRef
from .state import get_state
from .tasks import abandon, finish, next_event, send_to_session

log = logging.getLogger("mcpd.wake")

# A wake lease lives this long unless its leader refreshes it (every WAKE_LEASE_MS / 5):
# a leader killed with SIGKILL delays the next wake by at most this much.
WAKE_LEASE_MS = 5000
# A wake's outcome is kept this long for its waiters that missed its broadcast (a waiter
# looks again at least every WAKE_LEASE_MS).
WAKE_OUTCOME_SECONDS = 30


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


def _record(outcome: WakeOutcome) -> str:
    """The outcome as the lease keeps it (after its epoch): ok, status, code, when it was
    decided (ms since the epoch, this worker's clock) and the message."""
    decided = int(time.time() * 1000)
    return f"{int(outcome.ok)} {outcome.status} {outcome.code or '-'} {decided} {outcome.message}"


def _parse_record(record: str) -> WakeOutcome:
    epoch, ok, status, code, _decided, message = [*record.split(" ", 5), ""][:6]
    return WakeOutcome(ok == "1", int(status), "" if code == "-" else code, message, int(epoch))


def _remembered(outcome: WakeOutcome) -> ApiError:
    """A failed wake's error; with ``Retry-After`` while it is remembered."""
    error = outcome.error()
    if settings.MCPD_WAKE_FAILURE_SECONDS > 0:
        error.headers["Retry-After"] = str(math.ceil(settings.MCPD_WAKE_FAILURE_SECONDS))
    return error


def _target(llm: LlmRef, held: set[str]) -> BackendRef | None:
    """The backend to wake: a hibernating one holding a stream, the one with most slots."""
    sleeping = [b for b in llm.backends if b.status == LlmStatus.HIBERNATING and b.sid in held]
    if not sleeping:
        return None
    return max(sleeping, key=lambda b: math.inf if b.slots is None else b.slots)


async def _held(llm: LlmRef) -> set[str]:
    presence = get_state().presence
    return {b.sid for b in llm.backends if await presence.lookup(b.sid) is not None}


async def awake(llm: LlmRef, arrived: float) -> tuple[LlmRef, float]:
    """A hibernating row woken (once across workers): the row as read after the wake, and
    the seconds the wake took. 503 at once if no hibernating backend holds a stream."""
    if _target(llm, await _held(llm)) is None:
        raise offline(f"The publisher of '{llm.name}' holds no control stream.")
    woke = await ensure_awake(llm, arrived)
    current = await rowcache.reload(llm.name)
    if current is None or current.id != llm.id:
        raise ApiError(502, "llm_evicted", "the LLM was evicted")
    return current, woke


async def ensure_awake(llm: LlmRef, arrived: float) -> float:
    """Wait until a hibernating LLM is awake, waking it if nobody else is: one wake per LLM
    across all workers. ``arrived``: when the request came in (time.perf_counter()).
    Returns the seconds waited. Raises ApiError for every failure."""
    hub = await get_hub()
    leases = get_state().leases
    key = f"wake:{llm.id}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    # When this request arrived, as far as the wake is concerned: a wake that fails after it
    # is the wake it was waiting for, even if it had not joined it yet (issue 26).
    since_ms = int(time.time() * 1000) - int((time.perf_counter() - arrived) * 1000)
    deadline = started + settings.MCPD_WAKE_TIMEOUT_SECONDS + WAKE_LEASE_MS / 1000
    future = hub.wake_wait(str(llm.id))  # subscribe first, then look: no lost outcome
    joined = 0
    try:
        while True:
            current = await rowcache.reload(llm.name)
            if current is None or current.id != llm.id:
                raise ApiError(502, "llm_evicted", "the LLM was evicted")
            if current.status == LlmStatus.ACTIVE:
                return loop.time() - started
            if current.status == LlmStatus.INACTIVE:
                raise offline(f"The publisher of '{llm.name}' is offline.")
            step = await leases.join(key, hub.channel, WAKE_LEASE_MS, joined, since_ms)
            if step.kind == "outcome":
                outcome = _parse_record(step.record)
                if outcome.ok:
                    joined = 0  # look at the row again; a later sleep needs a new wake
                    continue
                raise _remembered(outcome)
            if step.kind == "lead":
                outcome = await asyncio.shield(hub.spawn(_lead_wake(current, key, step.epoch)))
            else:
                joined = step.epoch
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, "timeout", f"'{llm.name}' did not wake in time.")
                try:
                    outcome = await asyncio.wait_for(
                        asyncio.shield(future), min(WAKE_LEASE_MS / 1000, remaining)
                    )
                except TimeoutError:
                    continue  # a lost broadcast, or a dead leader: look again
                if outcome.epoch < joined:  # an earlier wake's: wait for this one's
                    future = hub.wake_wait(str(llm.id))
                    continue
            if outcome.ok:
                return loop.time() - started
            raise _remembered(outcome) if outcome.remembered else outcome.error()
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
    outcome = WakeOutcome(False, 502, "wake_failed", "wake failed", epoch)
    sent: tuple[str, float] | None = None  # the session woken, and when its task went
    try:
        # Read the row again now that this worker holds the lease: a request that read it
        # just before the previous wake succeeded must not wake it a second time (the
        # previous leader marks the row awake before it gives the lease back).
        current = await rowcache.reload(llm.name)
        if current is not None and current.id == llm.id and current.status == LlmStatus.ACTIVE:
            outcome = WakeOutcome(True, epoch=epoch)
            return outcome
        target = _target(llm, await _held(llm))
        if target is None:
            raise offline(f"The publisher of '{llm.name}' holds no control stream.")
        log.info("waking %s on session %s (lease epoch %d)", llm.name, target.sid, epoch)
        pending = await send_to_session(
            llm_id=str(llm.id),
            name=llm.name,
            session_id=target.sid,
            token_id=target.token_id,
            frame={"kind": "wake", "taskId": "", "llmName": llm.name},
        )
        sent = (target.sid, time.perf_counter())
        try:
            event = await next_event(pending, settings.MCPD_WAKE_TIMEOUT_SECONDS)
        except ApiError:
            await abandon(pending)
            raise
        await finish(pending)
        if event["kind"] == "result" and 200 <= event["status"] < 300:
            if lost:
                outcome = WakeOutcome(False, 502, "wake_failed", "wake lease lost; retry", epoch)
            else:
                await sync_to_async(services.llm_mark_awake)(
                    llm_id=llm.id, name=llm.name, session_id=target.sid
                )
                outcome = WakeOutcome(True, epoch=epoch)
        elif event["kind"] == "result":
            message = _wake_message(result_body(event))
            outcome = WakeOutcome(False, 502, "wake_failed", message, epoch)
        elif event["kind"] == "error":
            outcome = WakeOutcome(False, 502, event["code"], event["message"], epoch)
        else:
            outcome = WakeOutcome(False, 502, "wake_failed", "the publisher streamed a wake", epoch)
    except ApiError as exc:
        outcome = WakeOutcome(False, exc.status, exc.code, exc.message, epoch)
    except Exception as exc:
        log.exception("wake of %s failed", llm.name)
        outcome = WakeOutcome(False, 502, "wake_failed", f"wake failed: {exc}", epoch)
    finally:
        keeper.cancel()
        # A failed wake may be remembered (not an eviction, nor a publisher with no stream:
        # there was nothing to wake).
        failed = not outcome.ok and outcome.code not in ("llm_evicted", "publisher_offline")
        if failed:
            outcome = WakeOutcome(
                False, outcome.status, outcome.code, outcome.message, epoch, remembered=True
            )
        if sent is None:
            log.info("wake of %s: %s", llm.name, "ok" if outcome.ok else outcome.message)
        else:  # its line is the request log's (request_log.py)
            observers.wake_ended(
                observers.WakeEvent(
                    llm.name, sent[0], outcome.ok, outcome.code, time.perf_counter() - sent[1]
                )
            )
        memory = math.ceil(settings.MCPD_WAKE_FAILURE_SECONDS) if failed else 0
        try:
            await leases.end(key, epoch, _record(outcome), WAKE_OUTCOME_SECONDS, memory)
        finally:
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
    return outcome

"""Stream binding, on the worker that holds a publisher's control stream (SSE or WebSocket):
bind the session to it, keep the binding alive with each ping, yield its task frames, and
unbind when it ends — its rows go inactive and its tasks fail, unless a newer stream took
over."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings

from . import events, observers, selectors, services
from .errors import unavailable
from .hub import HANDOVER_SECONDS, Closing, ControlStream, Hub, get_hub
from .protocol import Frame
from .state import get_state

log = logging.getLogger("mcpd.binding")


async def stream_open(stream: ControlStream) -> None:
    """Bind the stream's session to it, here; the stream it replaces, on whichever worker,
    is closed (Redis decides which bind came last). Pair with stream_close in a finally:."""
    hub = await get_hub()
    session_id = stream.session_id
    hub.by_epoch[stream.epoch] = stream
    previous = await get_state().presence.bind(session_id, hub.channel, stream.epoch)
    hub.streams[session_id] = stream
    if previous is not None and previous.epoch != stream.epoch:
        await hub.send(
            previous, {"type": "stream.replace", "sid": session_id, "epoch": previous.epoch}
        )
    # Requests queued for its LLMs (a publisher back after a hand-over or a drop) go now.
    llm_ids = await sync_to_async(selectors.llm_ids_of_session)(session_id=session_id)
    await get_state().routing.kick(llm_ids)
    log.debug("session %s bound (epoch %s)", session_id, stream.epoch)  # see request_log
    observers.stream_opened(session_id, stream.transport, stream.epoch)


async def stream_refresh(stream: ControlStream) -> bool:
    """Keep the presence record alive. False once another stream has taken the session, or
    the stream's token was revoked (the check that holds even if a broadcast was lost); the
    stream is closed then, saying why."""
    hub = await get_hub()
    try:
        if await sync_to_async(services.token_is_revoked)(token_id=stream.token_id):
            stream.close(Closing.END)
            return False
        if not await get_state().presence.refresh(stream.session_id, hub.channel, stream.epoch):
            stream.close(Closing.REPLACED)
            return False
    except Exception as exc:
        # Redis or the database is away for a moment: the stream itself is fine, and what
        # Redis lost is written back when it returns (recovery.py). The outage is logged
        # once, by the hub.
        if unavailable(exc) is None:
            raise
    return True


async def stream_frames(stream: ControlStream) -> AsyncIterator[Frame | None]:
    """What to send down a bound control stream: its task frames in order, and None each
    time a keep-alive is due (every MCPD_PING_SECONDS, when the presence record is refreshed
    too). Ends when the stream is closed, replaced, or its token revoked (``stream.why``
    says which)."""
    loop = asyncio.get_running_loop()
    next_ping = loop.time() + settings.MCPD_PING_SECONDS
    while True:
        wait = next_ping - loop.time()
        if wait <= 0:
            if not await stream_refresh(stream):
                return
            yield None
            next_ping = loop.time() + settings.MCPD_PING_SECONDS
            continue
        try:
            async with asyncio.timeout(wait):
                frame = await stream.queue.get()
        except TimeoutError:
            continue
        if frame is None:
            return
        yield frame


async def stream_close(stream: ControlStream) -> None:
    """The stream ended. Unless a newer stream took over, the session is unbound: its rows go
    inactive and its tasks in flight fail with "publisher disconnected". A stream handed over
    (this worker drains) first gives its publisher HANDOVER_SECONDS to reconnect elsewhere."""
    hub = await get_hub()
    hub.closing_streams += 1
    observers.stream_closed(stream.session_id, stream.transport, stream.epoch, stream.why.value)
    try:
        await _close(hub, stream)
    finally:
        hub.closing_streams -= 1


async def _close(hub: Hub, stream: ControlStream) -> None:
    stream.closed = True
    hub.by_epoch.pop(stream.epoch, None)
    if hub.streams.get(stream.session_id) is stream:
        del hub.streams[stream.session_id]
    presence = get_state().presence
    sid = stream.session_id
    if stream.why == Closing.RECONNECT:
        # The stream that replaces it, on another worker, tells this hub (stream.replace).
        replaced = hub.handing_over[stream.epoch] = asyncio.Event()
        try:
            async with asyncio.timeout(HANDOVER_SECONDS):
                await replaced.wait()
            log.info("session %s handed over (epoch %s)", sid, stream.epoch)
            return
        except TimeoutError:
            pass
        finally:
            hub.handing_over.pop(stream.epoch, None)
    if not await presence.release(sid, hub.channel, stream.epoch):
        log.info("session %s stream replaced (epoch %s)", sid, stream.epoch)
        return
    await events.broadcast({"type": "session.closed", "sid": sid, "epoch": stream.epoch})
    unbound_at = await sync_to_async(services.session_unbind)(session_id=sid)
    if await presence.lookup(sid) is not None:
        # The publisher reconnected while we unbound: give the new stream its rows back.
        await sync_to_async(services.session_rebind)(session_id=sid, unbound_at=unbound_at)
        log.info("session %s rebound by a newer stream", sid)
    else:
        log.debug("session %s unbound", sid)  # the close's line: request_log.py

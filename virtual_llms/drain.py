"""Graceful drain of a broker worker on SIGTERM (manage.py serve), so a rolling restart
fails no request:

1. stop accepting connections (the listening sockets close; ``/readyz`` answers 503 and
   every response says ``Connection: close``, so load balancers and clients move on);
2. hand the control streams held here over: each publisher is told to reconnect elsewhere
   at once (SSE ``event: reconnect``, WebSocket close 4503), and this worker takes no new
   task for them meanwhile (its liveness key says "draining": state/lua/route.lua) while the
   tasks already sent go on (their answers reach any worker);
3. let the requests in flight finish, up to MCPD_DRAIN_SECONDS; at that deadline the ones
   still waiting end with an explicit 503 ``broker_restarting`` (a streamed one: an error
   event), never silence;
4. exit. A second SIGTERM exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from django.conf import settings

from . import usage
from .hub import HANDOVER_SECONDS, current_hub
from .protocol import error_event

log = logging.getLogger("mcpd.drain")

# After the deadline, requests told to end get this long to send their last bytes.
FINAL_SECONDS = 2.0

draining = False
_in_flight = 0
# Set when the last request in flight ends while draining.
_idle: asyncio.Event | None = None


def _counted(scope: dict[str, Any]) -> bool:
    """A request the drain waits for: any HTTP request but a control stream (handed over)."""
    return scope["type"] == "http" and not (
        scope.get("method") == "GET" and scope.get("path", "").endswith("/stream")
    )


@contextlib.contextmanager
def tracked(scope: dict[str, Any]) -> Iterator[None]:
    """Count the request while it is handled (mcpd_site/asgi.py)."""
    global _in_flight
    counted = _counted(scope)
    if counted:
        _in_flight += 1
    try:
        yield
    finally:
        if counted:
            _in_flight -= 1
            if not _in_flight and _idle is not None:
                _idle.set()


def in_flight() -> int:
    return _in_flight


def closing_send(send: Callable[[dict[str, Any]], Awaitable[None]]) -> Any:
    """``send`` that adds ``Connection: close`` to responses while draining, so a client
    with a kept-alive connection opens its next one elsewhere."""

    async def wrapped(message: dict[str, Any]) -> None:
        if draining and message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return wrapped


async def _until_idle(seconds: float) -> bool:
    """Wait up to ``seconds`` for the requests in flight to end; whether they did."""
    if _idle is None or not _in_flight:
        return not _in_flight
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_idle.wait(), max(0.0, seconds))
    return not _in_flight


async def drain(
    stop_listening: Callable[[], Awaitable[None]], exit_now: Callable[[], None]
) -> None:
    """Drain this worker (see the module's docstring), then ``exit_now()``."""
    global draining, _idle
    draining, _idle = True, asyncio.Event()
    started = time.monotonic()
    log.info(
        "draining: no new connections, streams handed over, %d request(s) in flight", _in_flight
    )
    try:
        await stop_listening()
        hub = current_hub()
        if hub is not None:
            await hub.drain()
        if not await _until_idle(settings.MCPD_DRAIN_SECONDS) and hub is not None:
            ended = error_event(503, "broker_restarting", "The broker worker is restarting; retry.")
            for pending in list(hub.pending.values()):
                pending.queue.put_nowait(ended)
            log.warning(
                "drain deadline: %d request(s) still waiting are ended with 503", len(hub.pending)
            )
            await _until_idle(FINAL_SECONDS)
        await usage.flush_at_exit()  # the records of the calls this worker served
        if hub is not None:
            # Streams handed over finish closing: unbound if their publisher did not come
            # back elsewhere (binding.stream_close), so their rows do not stay active.
            until = time.monotonic() + HANDOVER_SECONDS + FINAL_SECONDS
            # A few polls, once, at exit.
            while (hub.by_epoch or hub.closing_streams) and time.monotonic() < until:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        log.info("drained in %.2f s; exiting", time.monotonic() - started)
    except Exception:
        log.exception("draining failed; exiting")
    finally:
        exit_now()

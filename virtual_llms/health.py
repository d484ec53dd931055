"""Health checks (PROTOCOL.md "Health and metrics"): ``/healthz`` says the process serves,
``/readyz`` whether this worker can do its job — it reaches the database and, if configured,
Redis, its hub runs, and it is not draining (drain.py: a load balancer stops sending)."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, JsonResponse

from . import drain
from .hub import current_hub, get_hub
from .state import get_state

# Each probe's bound: a stalled service makes the worker unready, not the probe hang.
log = logging.getLogger("mcpd.health")

PROBE_SECONDS = 1.0


async def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def _database_ok() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        connection.close_if_unusable_or_obsolete()
        return False


async def _redis_ok() -> bool:
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            await get_state().ping()  # embedded: nothing to reach
        return True
    except Exception:
        return False


async def _hub_runs() -> bool:
    """This worker's hub runs, started now if nothing needed it yet: a worker a load
    balancer has sent no request is ready too (the hub starts on first use)."""
    if current_hub() is not None:
        return True
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            await get_hub()
    except Exception as exc:
        log.warning("the hub could not start: %s", exc or type(exc).__name__)
        return False
    return True


async def readyz(request: HttpRequest) -> JsonResponse:
    failed: list[str] = []
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            database = await sync_to_async(_database_ok)()
    except TimeoutError:
        database = False
    if not database:
        failed.append("database")
    if not await _redis_ok():
        failed.append("redis")
    if drain.draining or not await _hub_runs():
        failed.append("hub")
    if failed:
        return JsonResponse({"ok": False, "failed": failed}, status=503)
    return JsonResponse({"ok": True})

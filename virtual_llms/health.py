"""Health checks (PROTOCOL.md "Health and metrics"): ``/healthz`` says the process serves,
``/readyz`` whether this worker can do its job — it reaches the database and, if configured,
Redis, its hub runs, and it is not draining (drain.py: a load balancer stops sending)."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, JsonResponse

from . import drain
from .hub import current_hub
from .state import get_state

# Each probe's bound: a stalled service makes the worker unready, not the probe hang.
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
    if current_hub() is None or drain.draining:
        failed.append("hub")
    if failed:
        return JsonResponse({"ok": False, "failed": failed}, status=503)
    return JsonResponse({"ok": True})

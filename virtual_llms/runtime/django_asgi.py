"""Django's ASGI handler, adapted to a broker whose requests wait for minutes.

Relies on Django 5.2's ``ASGIHandler`` internals: ``handle``'s structure (re-written here
without the script prefix and the request signals), ``read_body``, ``create_request``,
``run_get_response``, ``send_response``, ``listen_for_disconnect``, ``_get_response_async``
and ``_get_response``, and on ``ThreadSensitiveContext`` being what ``__call__`` adds.
tests/test_runtime.py checks each against the installed Django; re-read ``handle`` against
Django's at every Django upgrade. :class:`ApiASGIHandler`'s cycle fix can go once Django
ticket #36700 is fixed in the release in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import IO, Any

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, ASGIRequest
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.http.response import HttpResponseBase

from .. import edge
from ..loopcache import PerLoop

log = logging.getLogger("mcpd.asgi")


class BrokerASGIHandler(ASGIHandler):
    """Django's ASGI handler without its per-request ``ThreadSensitiveContext``.

    Stock Django gives every request a thread of its own for sync code (the ORM), alive
    until the request ends: a request waiting two minutes for a publisher would hold an idle
    thread and, with persistent connections, a database connection. Here all sync code of
    the process runs on asgiref's one shared thread instead, so the thread count and the
    database connections stay flat however many requests wait. The broker's sync work is a
    row read or write per request (DESIGN.md pitfall 4), so serialising it costs little.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


class ApiASGIHandler(BrokerASGIHandler):
    """The handler of the JSON APIs (/api/, /v1/): no middleware, no thread hop of its own.

    Django's stock middleware is sync: under ASGI each hook is a hop to the sync thread, a
    dozen per request, and the APIs need none of it (no cookies, sessions, CSRF or
    templates; bearer tokens are checked in the views). load_middleware is Django's with an
    empty MIDDLEWARE list.

    Django's handle() also sends request_started and request_finished, each a hop to the
    sync thread (their receivers, close_old_connections and reset_queries, are sync) and 5 %
    of a worker's CPU even when run on the loop's thread (bench/profile.py). This handle()
    sends neither: the connections they look after are the ORM thread's, where all the
    process's sync code runs, and a task of this handler gives those the same check every
    DB_UPKEEP_SECONDS. A relayed request with its token and row cached then never leaves the
    event loop. Nothing else in the API listens to those signals (no cache, no templates),
    and its responses hold no resources to close (bodies are bytes or async generators,
    which send_response closes). handle() is otherwise Django 5.2's, less the script
    prefix (below).
    """

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        get_response = (
            self._get_response_async  # type: ignore[attr-defined]  # not in django-stubs
            if is_async
            else self._get_response  # type: ignore[attr-defined]  # not in django-stubs
        )
        # Every exception a view lets out becomes the contract's JSON error, under DEBUG too
        # (Django's would render its technical pages there); Django's conversion stays as
        # the last resort.
        handler = convert_exception_to_response(edge.json_exceptions(get_response))
        self._middleware_chain = self.adapt_method_mode(is_async, handler, is_async)

    def create_request(
        self, scope: Mapping[str, Any], body_file: IO[bytes]
    ) -> tuple[ASGIRequest, None] | tuple[None, HttpResponseBase]:
        """Django's, with its refusals (a path or header not UTF-8: 400, a body too big:
        413) in the contract's JSON instead of an HTML page or plain text."""
        made = super().create_request(scope, body_file)
        if made[1] is None:
            return made
        return None, edge.malformed_request(str(scope.get("path", "")), made[1].status_code)

    _upkeep: PerLoop[asyncio.Task[None]] = PerLoop()

    @classmethod
    def start_upkeep(cls) -> None:
        """Start this event loop's check of the ORM thread's connections, once: on the API's
        first request, or the first control socket's (consumers.py), whose heartbeat frames
        use that thread too and would otherwise keep a connection broken by a PostgreSQL
        restart on a worker that serves no HTTP."""
        cls._upkeep.get(lambda: asyncio.create_task(_db_upkeep(), name="mcpd-db-upkeep"))

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.start_upkeep()
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        # No set_script_prefix(): the API reverses no URLs, and setting the context-local
        # prefix cost 1.5 % of a worker's CPU (bench/profile.py).
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None
            body_file.close()
            await self.send_response(error_response, send)
            return

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left meanwhile
                await self.send_response(response, send)
            return response

        # As Django: a client that disconnects cancels the view (and so its cleanup runs).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Unlike Django's: daphne cancelling the application (10 s after a disconnect)
            # also cancels the view, and both tasks' outcomes are collected, not left to be
            # logged as "Task exception was never retrieved".
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            body_file.close()
            raise
        # The outcomes are read, not raised here: an exception raised in this frame would
        # hold it (its traceback), while the frame holds the tasks that hold the exception.
        # That cycle, once per request (the listener ends with RequestAborted as the
        # response goes out), left each request's ~50 objects (request, response, body file,
        # tasks) to the cyclic GC, whose full passes then took 40-400 ms on a worker
        # (docs/benchmarks-history.md). Django 5.2's handle() has the same cycle (Django ticket
        # #36700).
        for task in tasks:
            if not task.done():
                task.cancel()  # as Django: the view may handle its cancellation
                await asyncio.wait([task])
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None and not isinstance(error, RequestAborted):
                body_file.close()
                raise error
        body_file.close()


# How often the ORM thread's connections are checked as Django checks them per request:
# closed past CONN_MAX_AGE or after an error, health-checked again before their next use.
DB_UPKEEP_SECONDS = 1.0


async def _db_upkeep() -> None:
    while True:
        await asyncio.sleep(DB_UPKEEP_SECONDS)
        try:
            await sync_to_async(close_old_connections)()
        except Exception:
            log.exception("checking the database connections failed")

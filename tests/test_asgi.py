"""The API's ASGI handler: no request signals and no thread hop of its own; the ORM
thread's connections are checked on a timer instead (virtual_llms/runtime/django_asgi.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core import signals
from django.db import connection
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from mcpd_site import asgi
from tests.conftest import Tokens
from virtual_llms.models import Llm
from virtual_llms.runtime import django_asgi

pytestmark = [pytest.mark.django_db(transaction=True)]


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }


async def _get(path: str) -> tuple[int, bytes]:
    app = ApplicationCommunicator(asgi.application, _scope(path))
    await app.send_input({"type": "http.request", "body": b""})
    start = await app.receive_output(5)
    body = await app.receive_output(5)
    await app.wait(5)
    return start["status"], body["body"]


@pytest.fixture
async def upkeep(async_orm: None) -> Any:
    """Stop this loop's upkeep task at the end (it runs for the life of a worker)."""
    yield
    task = asgi.ApiASGIHandler._upkeep.pop()
    if task is not None:
        task.cancel()


async def test_api_requests_skip_the_request_signals_the_admin_keeps_them(upkeep: None) -> None:
    sent: list[tuple[str, int]] = []

    def started(**kwargs: Any) -> None:
        sent.append(("started", threading.get_ident()))

    def finished(**kwargs: Any) -> None:
        sent.append(("finished", threading.get_ident()))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        status, body = await _get("/v1/models")
        assert status == 401
        assert json.loads(body)["error"]["code"] == "unauthorized"
        assert sent == []
        status, _ = await _get("/admin/login/")
        assert status == 200
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert [name for name, _ in sent] == ["started", "finished"]
    assert all(thread != threading.get_ident() for _, thread in sent)  # Django's own hops


async def test_the_orm_threads_connections_are_checked_on_a_timer(
    upkeep: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(django_asgi, "DB_UPKEEP_SECONDS", 0.05)
    assert (await _get("/api/v1/llms"))[0] == 401  # starts the upkeep task

    def use_connection() -> None:
        Llm.objects.count()
        # As after a query under CONN_HEALTH_CHECKS (not in django-stubs, hence setattr).
        setattr(connection, "health_check_done", True)  # noqa: B010 - see above

    def checked() -> bool:
        # close_old_connections: closed (past CONN_MAX_AGE, as on SQLite where it is 0), or
        # to be health-checked before its next use.
        return connection.connection is None or not getattr(connection, "health_check_done")  # noqa: B009 - not in django-stubs

    await sync_to_async(use_connection)()
    for _ in range(40):
        if await sync_to_async(checked)():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the ORM thread's connection was never checked")


async def test_cancelling_the_application_cancels_the_view_and_the_listener(
    upkeep: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """daphne cancels an application 10 s after its client left: nothing may outlive it."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_view(self: Any, request: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(asgi.ApiASGIHandler, "run_get_response", slow_view)
    app = ApplicationCommunicator(asgi.application, _scope("/v1/models"))
    await app.send_input({"type": "http.request", "body": b""})
    await asyncio.wait_for(started.wait(), 5)
    app.future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await app.future
    assert cancelled.is_set()
    leftovers = [
        t
        for t in asyncio.all_tasks()
        if not t.done() and "listen_for_disconnect" in repr(t.get_coro())
    ]
    assert leftovers == []


async def _call_like_daphne(path: str, token: str) -> int:
    """One request the way daphne runs it: as the response's last body goes out, daphne
    finishes the request and puts ``http.disconnect`` on the application's queue at once,
    so the handler's listener ends (RequestAborted) with the view."""
    scope = _scope(path) | {"headers": [(b"authorization", f"Bearer {token}".encode())]}
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    queue.put_nowait({"type": "http.request", "body": b""})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            queue.put_nowait({"type": "http.disconnect"})

    app: Any = asgi.application  # called with plain dicts, as daphne does
    await asyncio.wait_for(app(scope, queue.get, send), 5)
    status: int = sent[0]["status"]
    return status


async def test_an_api_request_leaves_no_reference_cycle(upkeep: None, tokens: Tokens) -> None:
    """Each request's objects are freed when it ends, not left to the cyclic garbage
    collector, whose full passes stall a busy worker for tens of milliseconds."""
    for token, status in ((tokens.client_plain, 200), ("wrong", 401)):
        assert await _call_like_daphne("/v1/models", token) == status  # warm the caches
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                assert await _call_like_daphne("/v1/models", token) == status
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, HttpRequest | HttpResponseBase)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == [], status

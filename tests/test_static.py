"""Static files served by the broker (WhiteNoise behind virtual_llms/runtime/static_files.py):
the admin's CSS through the ASGI app, with DEBUG off and on, before and after collectstatic,
and no thread hop for any other request."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.test import override_settings

from mcpd_site import asgi
from virtual_llms.runtime.django_asgi import BrokerASGIHandler
from virtual_llms.runtime.static_files import StaticFilesMiddleware

CSS = "/static/admin/css/base.css"


def _scope(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    path, _, query = url.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }


async def _get(
    app: Any, path: str, *headers: tuple[bytes, bytes]
) -> tuple[int, dict[str, str], bytes]:
    communicator = ApplicationCommunicator(app, _scope(path, list(headers)))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(5)
    body = b""
    while True:
        message = await communicator.receive_output(5)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(5)
    head = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], head, body


def _stylesheet(page: bytes) -> str:
    """The URL of base.css the admin page links to."""
    match = re.search(rb'href="(/static/admin/css/base[^"]*\.css)"', page)
    assert match is not None, page[:500]
    return match.group(1).decode()


async def test_the_admin_css_answers_through_the_asgi_app() -> None:
    assert not settings.DEBUG
    status, head, page = await _get(asgi.application, "/admin/login/")
    assert status == 200
    assert _stylesheet(page) == CSS  # not collected: the plain name, from the finders
    status, head, body = await _get(asgi.application, CSS)
    assert status == 200
    assert head["content-type"].startswith("text/css")
    assert int(head["content-length"]) == len(body) > 1000
    assert b"body" in body
    status, _, _ = await _get(asgi.application, "/static/admin/css/no-such-file.css")
    assert status == 404


async def test_the_admin_css_answers_under_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    with override_settings(DEBUG=True):
        # The site's handler as a worker started with DJANGO_DEBUG=1 builds it: WhiteNoise
        # looks files up per request (autorefresh).
        monkeypatch.setattr(asgi, "site_app", BrokerASGIHandler())
        status, head, body = await _get(asgi.application, CSS)
    assert status == 200
    assert head["content-type"].startswith("text/css")
    assert head["cache-control"] == "max-age=0, public"
    assert b"body" in body


async def test_after_collectstatic_names_are_hashed_compressed_and_cached_forever(
    tmp_path: Path,
) -> None:
    root = tmp_path / "static"
    with override_settings(STATIC_ROOT=root, WHITENOISE_USE_FINDERS=False):
        # The admin's files only: the API docs' bundles would take seconds to compress.
        await asyncio.to_thread(
            call_command,
            "collectstatic",
            "--noinput",
            "--ignore=rest_framework",
            "--ignore=drf_spectacular_sidecar",
            verbosity=0,
        )
        assert (root / "staticfiles.json").is_file()
        app = BrokerASGIHandler()
        status, _, page = await _get(app, "/admin/login/")
        assert status == 200
        hashed = _stylesheet(page)
        assert re.fullmatch(r"/static/admin/css/base\.[0-9a-f]{12}\.css", hashed)
        status, head, body = await _get(app, hashed, (b"accept-encoding", b"gzip"))
        assert status == 200
        assert head["content-encoding"] == "gzip"
        assert "immutable" in head["cache-control"]
        assert "max-age=315360000" in head["cache-control"]
        assert b"body" in gzip.decompress(body)
        assert head["vary"] == "Accept-Encoding"
        # The plain name is still served, but only for a minute.
        status, head, _ = await _get(app, CSS)
        assert status == 200
        assert head["cache-control"] == "max-age=60, public"


async def test_a_range_of_a_static_file() -> None:
    _, _, whole = await _get(asgi.application, CSS)
    status, head, part = await _get(asgi.application, CSS, (b"range", b"bytes=10-19"))
    assert status == 206
    assert part == whole[10:20]
    assert head["content-range"] == f"bytes 10-19/{len(whole)}"


# --- no thread hop for anything but /static/ ------------------------------------------------


async def test_other_requests_pass_straight_through_on_the_event_loop() -> None:
    threads: list[int] = []

    async def view(request: HttpRequest) -> HttpResponseBase:
        threads.append(threading.get_ident())
        return HttpResponse(b"view")

    middleware = StaticFilesMiddleware(view)
    request = HttpRequest()
    for path in ("/v1/models", "/admin/", "/static/admin/css/no-such-file.css"):
        request.path = request.path_info = path
        response = await middleware(request)
        assert isinstance(response, HttpResponse)
        assert response.content == b"view"
    assert threads == [threading.get_ident()] * 3  # the loop's thread, each time


def test_a_sync_handler_is_refused() -> None:
    with pytest.raises(TypeError, match="async"):
        StaticFilesMiddleware(lambda request: HttpResponse())  # type: ignore[arg-type,return-value]


def _adaptations(caplog: pytest.LogCaptureFixture, middleware: list[str]) -> list[str]:
    caplog.clear()
    with (
        override_settings(DEBUG=True, MIDDLEWARE=middleware),
        caplog.at_level(logging.DEBUG, logger="django.request"),
    ):
        BrokerASGIHandler()  # loads the middleware chain; Django logs each adaptation
    return [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]


def test_the_admin_middleware_chain_is_async_throughout(caplog: pytest.LogCaptureFixture) -> None:
    """Django adapts (a thread hop per request) any sync-only middleware in an async
    handler, and logs it under DEBUG: none is, with the static files in the chain."""
    assert "virtual_llms.runtime.static_files.StaticFilesMiddleware" in settings.MIDDLEWARE
    assert _adaptations(caplog, list(settings.MIDDLEWARE)) == []
    # What the test guards against: WhiteNoise's own middleware, sync-only.
    stock = [
        "whitenoise.middleware.WhiteNoiseMiddleware" if m.endswith("StaticFilesMiddleware") else m
        for m in settings.MIDDLEWARE
    ]
    assert _adaptations(caplog, stock) != []


def test_the_system_check_says_when_static_files_are_not_collected() -> None:
    from django.core.checks import run_checks

    with override_settings(DEBUG=False, MCPD_STATIC_COLLECTED=False):
        assert "mcpd.W003" in {message.id for message in run_checks()}
    with override_settings(DEBUG=False, MCPD_STATIC_COLLECTED=True):
        assert "mcpd.W003" not in {message.id for message in run_checks()}

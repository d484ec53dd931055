"""WhiteNoise's static file serving as an async-only Django middleware, for daphne, and its
storage usable before collectstatic.

WhiteNoise's ``WhiteNoiseMiddleware`` is sync-only. In an async handler Django adapts a
sync middleware by running it on a thread (``sync_to_async``) and the rest of the chain,
view included, back on the event loop (``async_to_sync``), for *every* request it sees:
two thread hops per request, and under :class:`~.django_asgi.BrokerASGIHandler` all sync
code of the process shares one thread, so a request that waits (a streamed answer, a slow
wake) would hold that thread until it ends. Measured before this module: it broke a
slow-wake streaming test and added latency to every call.

:class:`StaticFilesMiddleware` is async-only. A request outside ``STATIC_URL`` is awaited
straight through: no thread, no WhiteNoise code. A request under it is looked up and read
by WhiteNoise on a worker thread of the default executor (not the ORM's thread: file I/O
never queues database work), then answered as a plain ``HttpResponse`` with WhiteNoise's
headers (``Content-Type``, ``Cache-Control``, ``ETag``, ``Vary``, ``Content-Encoding`` of
the ``.br``/``.gz`` file it chose, a ``Range`` slice...). The body is read whole: the
largest static file is about 1.5 MB (Swagger UI's bundle; its compressed twin ~400 KB),
and a ``FileResponse`` would hand Django a sync file iterator, which it reads with a
warning on a thread anyway.

:class:`StaticFilesStorage` is WhiteNoise's compressed, hashed storage, which needs the
manifest collectstatic writes: without it every page naming a static file fails. Before
collectstatic (``make run``, the tests, a broker started from a checkout, and collectstatic
itself) it gives the plain names, and WhiteNoise serves them from the apps' directories
(``WHITENOISE_USE_FINDERS``, settings.py).

Relies on whitenoise 6's ``WhiteNoiseMiddleware``: its constructor reading the settings
and scanning ``STATIC_ROOT`` (and the finders), ``autorefresh``, ``files``, ``find_file``,
``static_prefix`` and the static ``serve``; and on Django's ``ManifestFilesMixin``:
``hashed_files`` (the manifest's names, empty without one) and ``stored_name``.
tests/test_runtime.py checks each. The middleware can go once WhiteNoise ships an async
one (whitenoise issue #179).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware
from whitenoise.storage import CompressedManifestStaticFilesStorage

GetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


class _Settings:
    """Django's settings as WhiteNoise reads them, less a ``STATIC_ROOT`` that does not exist
    yet (no collectstatic: the files come from the finders), which it would warn about."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(settings, name)
        if name == "STATIC_ROOT" and value and not os.path.isdir(value):
            return None
        return value


class StaticFilesMiddleware:
    """Serve ``STATIC_URL`` with WhiteNoise; pass every other request on untouched."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        if not iscoroutinefunction(get_response):
            raise TypeError("StaticFilesMiddleware runs only in an async handler (ASGI).")
        self.get_response = get_response
        # Reads the WHITENOISE_* settings and indexes STATIC_ROOT (and, with
        # WHITENOISE_USE_FINDERS, the apps' static directories) once, at startup.
        self.whitenoise = WhiteNoiseMiddleware(get_response=None, settings=_Settings())
        self.prefix: str = self.whitenoise.static_prefix
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not request.path_info.startswith(self.prefix):
            return await self.get_response(request)
        response = await sync_to_async(self._serve, thread_sensitive=False)(request)
        if response is None:  # not a static file: Django's 404 (or a view under the prefix)
            return await self.get_response(request)
        return response

    def _serve(self, request: HttpRequest) -> HttpResponse | None:
        """WhiteNoise's answer for this path, read into memory; None if it has no file."""
        whitenoise = self.whitenoise
        path = request.path_info
        if whitenoise.autorefresh:  # DEBUG: looked up on disk (and the finders) each time
            static_file = whitenoise.find_file(path)
        else:
            static_file = whitenoise.files.get(path)
        if static_file is None:
            return None
        served = whitenoise.serve(static_file, request)  # a FileResponse over an open file
        try:
            body = b"".join(served.streaming_content)  # a file: a sync iterator
        finally:
            served.close()
        response = HttpResponse(body, status=served.status_code)
        del response["Content-Type"]  # WhiteNoise's own, copied below
        for key, value in served.items():
            response[key] = value
        return response


class StaticFilesStorage(CompressedManifestStaticFilesStorage):  # type: ignore[misc,unused-ignore]  # untyped
    """Hashed names once collectstatic has written its manifest; the plain names before."""

    def stored_name(self, name: str) -> str:
        if not self.hashed_files:  # no manifest (yet): nothing was collected
            return name
        stored: str = super().stored_name(name)
        return stored

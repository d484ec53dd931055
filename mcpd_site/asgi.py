"""ASGI entry point: ``daphne mcpd_site.asgi:application``.

HTTP goes to Django (async views for everything that waits); WebSocket goes to the
publisher's control socket. No origin check on the socket: publishers are not browsers and
send no Origin header; they authenticate with a bearer token in the handshake
(DESIGN.md pitfall 8).
"""

import os
from typing import Any

import django
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcpd_site.settings")
# Django first: it sets up the app registry the consumers' imports need.
django.setup(set_prefix=False)


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
    """The handler of the JSON APIs (/api/, /v1/): no middleware.

    Django's stock middleware is sync: under ASGI each hook is a hop to the sync thread, a
    dozen per request, and the APIs need none of it (no cookies, sessions, CSRF or
    templates; bearer tokens are checked in the views). This is load_middleware with an
    empty MIDDLEWARE list.
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
        handler = convert_exception_to_response(get_response)
        self._middleware_chain = self.adapt_method_mode(is_async, handler, is_async)


api_app = ApiASGIHandler()
site_app = BrokerASGIHandler()  # the admin (and anything else): the full middleware


async def django_asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path: str = scope.get("path", "")
    app = api_app if path.startswith(("/api/", "/v1/")) else site_app
    await app(scope, receive, send)


from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402 - after Django setup
from django.urls import path  # noqa: E402 - after Django setup

from virtual_llms.consumers import ControlSocketConsumer  # noqa: E402 - after Django setup

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path(
                    "api/v1/virtual/sessions/<str:session_id>/ws",
                    ControlSocketConsumer.as_asgi(),
                )
            ]
        ),
    }
)

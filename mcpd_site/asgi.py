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


django_asgi_app = BrokerASGIHandler()

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

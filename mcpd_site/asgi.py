"""ASGI entry point: ``daphne mcpd_site.asgi:application``.

HTTP goes to Django (async views for everything that waits); WebSocket goes to the
publisher's control socket. No origin check on the socket: publishers are not browsers and
send no Origin header; they authenticate with a bearer token in the handshake
(DESIGN.md pitfall 8).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcpd_site.settings")
# Django first: it sets up the app registry the consumers' imports need.
django_asgi_app = get_asgi_application()

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

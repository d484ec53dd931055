"""ASGI entry point: ``daphne mcpd_site.asgi:application``.

HTTP goes to Django (async views for everything that waits); WebSocket goes to the
publisher's control socket. No origin check on the socket: publishers are not browsers and
send no Origin header; they authenticate with a bearer token in the handshake
(DESIGN.md pitfall 8).
"""

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcpd_site.settings")
# Django first: it sets up the app registry the consumers' imports need.
django.setup(set_prefix=False)


from virtual_llms import drain  # noqa: E402 - after Django setup
from virtual_llms.runtime.django_asgi import (  # noqa: E402 - after Django setup
    ApiASGIHandler,
    BrokerASGIHandler,
)

api_app = ApiASGIHandler()
site_app = BrokerASGIHandler()  # the admin (and anything else): the full middleware


async def django_asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path: str = scope.get("path", "")
    app = (
        api_app
        if path.startswith(("/api/", "/v1/")) or path in ("/api", "/v1", "/metrics")
        else site_app
    )
    # Counted for a graceful drain, which also tells clients to reconnect elsewhere.
    with drain.tracked(scope):
        await app(scope, receive, drain.closing_send(send))


from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402 - after Django setup
from django.urls import path, re_path  # noqa: E402 - after Django setup

from virtual_llms.consumers import (  # noqa: E402 - after Django setup
    ControlSocketConsumer,
    NoRouteConsumer,
)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                # channels routes ASGI apps with django.urls.path, which its stubs type for views
                path(  # type: ignore[list-item]
                    "api/v1/virtual/sessions/<str:session_id>/ws",
                    ControlSocketConsumer.as_asgi(),  # type: ignore[arg-type]
                ),
                # Any other path (an empty id, a/b, ../..): refused with 4404, not an HTTP 500.
                re_path(r"", NoRouteConsumer.as_asgi()),  # type: ignore[list-item, arg-type]
            ]
        ),
    }
)

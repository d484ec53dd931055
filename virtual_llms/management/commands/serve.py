"""``manage.py serve``: run one daphne process with the flags mcpd needs, stopping
gracefully on SIGTERM (drain.py).

WebSocket messages and frames may carry a whole request body (MCPD_MAX_BODY_BYTES) plus
framing, and daphne caps both at 1 MiB by default; keep-alive pings every 15 s keep proxies
from cutting idle control sockets (DESIGN.md pitfalls 5 and 6). The listening socket gets a
backlog of 2,048 connections instead of Twisted's 50 (``--backlog``). Anything after ``--``
is passed to daphne as it is.
"""

import gc
from typing import Any

from daphne.endpoints import build_endpoint_description_strings
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

# Room for the JSON framing around a body of MCPD_MAX_BODY_BYTES.
FRAMING_BYTES = 1024 * 1024
# Connections the kernel queues for a worker that has not accepted them yet (capped by
# net.core.somaxconn). Twisted listens with 50: a burst of new connections (500 clients
# waiting on one wake; a publisher answering all of them at once) overflows that while the
# worker is busy, and Linux drops what does not fit, or resets it: 13 of 500 answers in one
# bench run. 2,048 is what uvicorn and gunicorn use.
BACKLOG = 2048


def endpoint(bind: str, port: int, backlog: int) -> str:
    """The TCP endpoint daphne builds for ``-b bind -p port``, with a backlog."""
    (tcp,) = build_endpoint_description_strings(host=bind, port=port)
    return f"{tcp}:backlog={backlog}"


def daphne_args(bind: str, port: int, extra: list[str], backlog: int = BACKLOG) -> list[str]:
    limit = str(settings.MCPD_MAX_BODY_BYTES + FRAMING_BYTES)
    return [
        "-e",
        endpoint(bind, port, backlog),
        "--websocket-max-message-size",
        limit,
        "--websocket-max-frame-size",
        limit,
        "--ping-interval",
        str(int(settings.MCPD_PING_SECONDS)),
        "--ping-timeout",
        "30",
        *access_log(extra),
        *extra,
        "mcpd_site.asgi:application",
    ]


def access_log(extra: list[str]) -> list[str]:
    """daphne's access log as MCPD_ACCESS_LOG says, unless the daphne options given after
    ``--`` choose it. Off, daphne writes none: its verbosity 0 only turns the access log off
    here (Django's LOGGING is configured already, so daphne's logging.basicConfig does
    nothing)."""
    if any(option.split("=")[0] in ("--access-log", "-v", "--verbosity") for option in extra):
        return []
    if settings.MCPD_ACCESS_LOG:
        return ["--access-log", settings.MCPD_ACCESS_LOG]
    return ["--verbosity", "0"]


class Command(BaseCommand):
    help = "Serve the broker with daphne (one process; run several behind a load balancer)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bind", default="127.0.0.1", help="address (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        parser.add_argument(
            "--backlog",
            type=int,
            default=BACKLOG,
            help=f"connections queued before they are accepted (default {BACKLOG})",
        )
        parser.add_argument("daphne", nargs="*", help="more daphne options, after --")

    def handle(
        self, *args: Any, bind: str, port: int, backlog: int, daphne: list[str], **options: Any
    ) -> None:
        from virtual_llms import request_log
        from virtual_llms.runtime.daphne_server import (
            draining_cli,
            head_without_body,
            json_basic_errors,
            skip_form_parsing,
            skip_twisted_request_log,
        )

        if backlog < 1:
            raise CommandError("--backlog must be at least 1.")
        request_log.set_worker(str(port))  # the log lines' worker=
        skip_form_parsing()
        skip_twisted_request_log()
        json_basic_errors()
        head_without_body()
        freeze_startup_objects()
        draining_cli().run(daphne_args(bind, port, daphne, backlog))


# Allocations between two collections of the youngest generation (Python's default: 700).
# Each collection moves the objects of the requests in flight to an older generation; once
# enough have moved, a full collection walks every live object (the idle keep-alive
# connections and sessions included: 25 objects each). At 700, a worker holding 2,200 idle
# connections made one or two full passes a second under load, 13-43 ms each; at 10,000 a
# tenth as many young collections run (so about a tenth as many objects move up), and the
# 1-process relay rate after the bench's capacity step went 850 → 956-1,275 req/s (bench
# publisher), 567-638 → 708-779 (agent) (docs/benchmarks-history.md, the session of 19:28). What a
# request allocates is freed by reference counting as it ends (tests/test_asgi.py: no
# cycles), so little waits for these passes.
GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Load everything a worker imports (the ASGI application, the URLconf and its views)
    now, then move those ~100,000 objects out of the garbage collector's sight
    (``gc.freeze``). Otherwise every full collection walks them all: 40-55 ms pauses, a
    dozen per minute under load, which set the p99 of every request they hit (measured
    with gc.callbacks on one worker at 170 req/s; frozen: 2-3 ms). Startup objects live as
    long as the process anyway. Then collect the youngest generation less often
    (:data:`GC_YOUNG_THRESHOLD`)."""
    from django.urls import get_resolver

    import mcpd_site.asgi  # noqa: F401 - imported for its side effects: the app and handlers

    get_resolver().url_patterns  # noqa: B018 - imports the URLconf
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)

"""What daphne does not expose, set by replacing the classes it builds from.

- daphne's own refusals (:func:`json_basic_errors`) in the contract's JSON on /api/ and /v1/,
  and no body after a HEAD's headers (:func:`head_without_body`).
- Two switches: Twisted's form parsing and its request log line (below). Relies on daphne
  4.2 building its requests from ``daphne.http_protocol.WebRequest`` (a Twisted ``Request``,
  whose ``parsePOSTFormSubmission`` argument exists since Twisted 22.8) and its factory from
  ``daphne.server.HTTPFactory`` (a Twisted ``HTTPFactory`` with ``log``).
- A bound on what each connection's transport holds unsent: :class:`DrainingServer` is also
  a ``send_buffers.MeteredServer`` (that module says what it relies on).
- A graceful stop: :class:`DrainingServer` keeps the listening ports daphne opens (its
  ``listen_success``) and handles SIGTERM itself (daphne's ``signal_handlers`` off: Twisted's
  handler stops the reactor at once, cutting every request), running drain.py first. Relies
  on ``Server(signal_handlers=...)`` and ``CommandLineInterface.server_class``. Connections
  open when it stops listening stay open while it drains: a request that arrives on one is
  served (with ``Connection: close``), including one whose bytes were in flight as the
  listener closed (closing the idle ones then cut such a request in a test's rolling
  restart).

tests/test_runtime.py checks each. Each can go if daphne gains the option.
"""

from __future__ import annotations

from typing import Any


def skip_form_parsing() -> None:
    """Turn off Twisted's parsing of POST bodies into ``request.args``, which daphne never
    reads (it hands the raw body to the application). Left on, Twisted parses the
    Content-Type of every POST with the email package, and form bodies whole: 7 % of a
    worker's CPU under relayed load (bench/profile.py, 3 workers, 250 req/s). Twisted's
    switch is Request's ``parsePOSTFormSubmission`` argument; daphne does not expose it,
    so its request class is replaced by a subclass that passes it."""
    from daphne import http_protocol

    base = http_protocol.WebRequest
    if getattr(base, "mcpd_no_form_parsing", False):
        return

    class WebRequest(base):  # type: ignore[misc,valid-type]  # daphne is untyped
        mcpd_no_form_parsing = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(*args, **kwargs)

    http_protocol.WebRequest = WebRequest


API_PATHS = (b"/api/", b"/v1/")


def json_basic_errors() -> None:
    """daphne's own refusals, made before the application sees the request (a header value
    holding a byte it refuses, such as ``\\x85``; a path or query string that is not ASCII;
    an application that failed before its answer), answered on /api/ and /v1/ as the
    contract's JSON error instead of daphne's HTML page (tests/test_fuzz.py found them).
    Relies on daphne 4.2 answering them all through ``WebRequest.basic_error``."""
    from daphne import http_protocol

    base = http_protocol.WebRequest
    if getattr(base, "mcpd_json_errors", False):
        return

    class WebRequest(base):  # type: ignore[misc,valid-type]  # daphne is untyped
        mcpd_json_errors = True

        def basic_error(self, status: int, status_text: bytes, body: str) -> None:
            path = bytes(self.uri or b"").split(b"?", 1)[0]
            if not (path.startswith(API_PATHS) or path in (b"/api", b"/v1")):
                super().basic_error(status, status_text, body)
                return
            from virtual_llms.errors import ApiError

            code = "internal_error" if status >= 500 else "invalid_request"
            error = ApiError(status, code, f"{body}.")
            headers = [(b"Content-Type", b"application/json")]
            headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
            self.handle_reply({"type": "http.response.start", "status": status, "headers": headers})
            self.handle_reply(
                {"type": "http.response.body", "body": error.body(openai=path.startswith(b"/v1"))}
            )

    http_protocol.WebRequest = WebRequest


def head_without_body() -> None:
    """No body bytes in the answer to a HEAD. Twisted drops a HEAD's body by replacing the
    request's ``write`` after the first, but daphne writes each later part of a body through
    ``http.Request.write(self, ...)``, which that does not reach: an answer of several parts
    (``/api/schema/``) sent the rest of its body after the headers, and the next answer on
    the kept-alive connection was read from the middle of it (tests/test_fuzz.py found it).
    Relies on daphne 4.2 handing every body part to ``WebRequest.handle_reply``."""
    from daphne import http_protocol

    base = http_protocol.WebRequest
    if getattr(base, "mcpd_head_without_body", False):
        return

    class WebRequest(base):  # type: ignore[misc,valid-type]  # daphne is untyped
        mcpd_head_without_body = True

        def handle_reply(self, message: dict[str, Any]) -> None:
            if self.method == b"HEAD" and message.get("type") == "http.response.body":
                message = {**message, "body": b""}
            super().handle_reply(message)

    http_protocol.WebRequest = WebRequest


def skip_twisted_request_log() -> None:
    """Turn off Twisted's own per-request log line. Twisted's HTTPFactory formats a
    combined-log line for every request and hands it to Twisted's logging, which daphne
    points nowhere (verbosity 0-1) or at the stdlib logger, next to its own access log (2-3):
    2.4 % of a worker's CPU for a line nobody reads (bench/profile.py, 3 workers, 400 req/s).
    daphne's access log (stdout at verbosity 1, or ``--access-log``) is unchanged. daphne
    builds its factory from ``daphne.server.HTTPFactory``, so that name gets a subclass whose
    ``log`` does nothing."""
    from daphne import server

    base = server.HTTPFactory
    if getattr(base, "mcpd_no_twisted_log", False):
        return

    class HTTPFactory(base):  # type: ignore[misc,valid-type]  # daphne is untyped
        mcpd_no_twisted_log = True

        def log(self, request: Any) -> None:
            return

    server.HTTPFactory = HTTPFactory


def draining_cli() -> Any:
    """daphne's command line, serving with :class:`DrainingServer`."""
    import asyncio
    import signal

    from daphne.cli import CommandLineInterface
    from daphne.server import Server
    from django.conf import settings
    from twisted.internet import defer, reactor

    from virtual_llms import drain

    from .send_buffers import MeteredServer

    class DrainingServer(MeteredServer, Server):  # type: ignore[misc,unused-ignore]  # daphne is untyped
        # Every connection's send buffer is bounded (runtime/send_buffers.py); the control
        # streams raise theirs (backpressure.py).
        default_limit = settings.MCPD_CLIENT_BUFFER_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["signal_handlers"] = False
            super().__init__(*args, **kwargs)
            self.ports: list[Any] = []
            self.stopping = False
            self.draining: asyncio.Future[None] | None = None

        def listen_success(self, port: Any) -> None:
            self.ports.append(port)
            super().listen_success(port)

        def run(self) -> None:
            reactor.callWhenRunning(self._install_signal_handlers)
            super().run()

        def _install_signal_handlers(self) -> None:
            loop = asyncio.get_event_loop()
            for number in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(number, self._on_signal)

        def _on_signal(self) -> None:
            if self.stopping:  # a second signal: exit at once
                self.stop()
                return
            self.stopping = True
            self.draining = asyncio.ensure_future(drain.drain(self._stop_listening, self.stop))

        async def _stop_listening(self) -> None:
            done = [defer.maybeDeferred(port.stopListening) for port in self.ports]
            await defer.DeferredList(done).asFuture(asyncio.get_event_loop())

    class DrainingCLI(CommandLineInterface):  # type: ignore[misc,unused-ignore]  # daphne is untyped
        server_class = DrainingServer

    return DrainingCLI()

"""Two switches daphne does not expose, set by replacing the classes it builds from.

Relies on daphne 4.2 building its requests from ``daphne.http_protocol.WebRequest`` (a
Twisted ``Request``, whose ``parsePOSTFormSubmission`` argument exists since Twisted 22.8)
and its factory from ``daphne.server.HTTPFactory`` (a Twisted ``HTTPFactory`` with ``log``).
tests/test_runtime.py checks both. Each can go if daphne gains the option.
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

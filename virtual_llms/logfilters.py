"""Log filters: drop library log lines that repeat what mcpd already logs once.

Django logs every 4xx/5xx response on ``django.request`` (``WARNING Not Found: ...``, ``ERROR
Service Unavailable: ...``). On mcpd's own paths those are answers the contract defines —
a 404 ``model_not_found``, a 503 ``publisher_offline`` with ``Retry-After`` — which the
request log line (``mcpd.request``, at INFO) and the access log already show; at ERROR they
page an operator for nothing. A 500 is a bug and keeps its line and traceback.
"""

from __future__ import annotations

import logging

API_PREFIXES = ("/v1/", "/api/")


class ContractResponses(logging.Filter):
    """For ``django.request``: drop the line of an /api/ or /v1/ response below 500 or a 502,
    503 or 504 (an upstream's, a publisher's or an outage's: answered with the contract's
    code); keep everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(record, "status_code", None)
        request = getattr(record, "request", None)
        path = getattr(request, "path", "") or ""
        if not isinstance(status, int) or not path.startswith(API_PREFIXES):
            return True
        return status == 500 or status > 504

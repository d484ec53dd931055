"""One exception type for every refusal, rendered in the contract's two error shapes.

``/api/`` routes: ``{"error": {"code", "message"}}``.
``/v1/`` routes (OpenAI-compatible): ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpResponse

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    502: "api_error",
    503: "api_error",
    504: "api_error",
}


class ApiError(Exception):
    """A refusal with an HTTP status, a snake_case code and a message for humans."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        openai_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        # The OpenAI shape's ``type`` when it is not the status's (a 429's "tokens").
        self.openai_type = openai_type
        if status == 503:
            # A publisher that lost its stream reconnects within seconds.
            self.headers.setdefault("Retry-After", "5")

    def api_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type or _OPENAI_TYPES.get(self.status, "api_error"),
                "code": self.code,
            }
        }

    def body(self, *, openai: bool) -> bytes:
        """The error as a JSON body, in the /v1/ (``openai``) or the /api/ shape."""
        return json.dumps(self.openai_body() if openai else self.api_body()).encode()

    def response(self, *, openai: bool) -> HttpResponse:
        body = self.openai_body() if openai else self.api_body()
        resp = HttpResponse(json.dumps(body), status=self.status, content_type="application/json")
        for key, value in self.headers.items():
            resp[key] = value
        return resp


def offline(message: str) -> ApiError:
    return ApiError(503, "publisher_offline", message)


def unavailable(exc: BaseException) -> ApiError | None:
    """A 503 for an exception that means a service the broker needs is away — Redis (the
    shared state, the channel layer) or the database — rather than a bug: the request is
    refused with ``Retry-After``, never answered 500 (and logged once per outage by the
    hub, not with a traceback per request). None for anything else."""
    import redis.exceptions
    from django.db import InterfaceError, OperationalError

    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return ApiError(
            503,
            "state_unavailable",
            "The broker's shared state (Redis) is unreachable; retry shortly.",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, OperationalError | InterfaceError):
        return ApiError(
            503,
            "database_unavailable",
            "The broker's database is unreachable; retry shortly.",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, ServiceTimeout):
        return ApiError(
            503,
            "state_unavailable",
            f"The broker's {exc.service} did not answer in time; retry shortly.",
            headers={"Retry-After": "1"},
        )
    return None


class ServiceTimeout(TimeoutError):
    """A call to a service the broker needs (the channel layer) took too long."""

    def __init__(self, service: str) -> None:
        super().__init__(f"{service} did not answer in time")
        self.service = service

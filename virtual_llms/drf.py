"""DRF glue: bearer-token authentication, role permission, JSON in and out whatever the
headers say, and the contract's error shape for every DRF view
(``{"error": {"code", "message"}}``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework import authentication, exceptions, permissions
from rest_framework import exceptions as drf_exceptions
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from . import jsonio
from .auth import authenticate_token, parse_bearer, require_role
from .errors import ApiError, unavailable
from .models import ApiToken


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """DRF adapter of :func:`authenticate_token`. ``request.user`` is the ApiToken."""

    def authenticate(self, request: Request) -> tuple[ApiToken, ApiToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        try:
            token = authenticate_token(parse_bearer(header), fresh=True)
        except ApiError as exc:
            raise exceptions.AuthenticationFailed(exc.message) from exc
        return token, token

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class HasRole(permissions.BasePermission):
    """DRF permission: the token's role is one of ``view.roles`` (403 otherwise)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        token = request.auth
        if not isinstance(token, ApiToken):
            raise exceptions.NotAuthenticated("Missing bearer token (Authorization: Bearer …).")
        require_role(token, getattr(view, "roles", ()))
        return True


class JsonOnly(BaseContentNegotiation):
    """JSON whatever the request's ``Accept`` and ``Content-Type`` say (PROTOCOL.md "OpenAI
    surface"), as on /v1/: the view's first parser and renderer, always.

    DRF's default negotiation answers 406 to an ``Accept`` it cannot meet (httpx-sse sets
    ``Accept: text/event-stream`` on every call of a client it is given) and 415 to a body
    without ``Content-Type``, where the API has one format only. The views that offer a
    choice (the OpenAPI document's JSON and YAML) set DRF's DefaultContentNegotiation back.
    """

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return next(iter(parsers), None)

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type or "application/json"


class Negotiated(DefaultContentNegotiation):
    """DRF's negotiation (``?format=`` and ``Accept``) for a view with several formats (the
    OpenAPI document), but an ``Accept`` none of them meets gets the first, never 406."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderers = list(renderers)
        try:
            chosen: tuple[BaseRenderer, str] = super().select_renderer(
                request, renderers, format_suffix
            )
            return chosen
        except drf_exceptions.NotAcceptable:
            return JsonOnly().select_renderer(request, renderers, format_suffix)


class InvalidJson(drf_exceptions.ParseError):
    default_code = "invalid_json"


class LenientJSONParser(JSONParser):
    """A body read as JSON whatever its ``Content-Type``, by the rule of /v1/ (jsonio: UTF-8,
    16 or 32, as RFC 8259 allows); not JSON: 400 ``invalid_json``."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return jsonio.loads(stream.read(), settings.MCPD_MAX_JSON_DEPTH)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidJson(f"Malformed JSON body: {exc}") from exc


_DRF_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    500: "internal_error",
}


def _flatten(detail: Any) -> str:
    if isinstance(detail, dict):
        parts = []
        for key, value in detail.items():
            text = _flatten(value)
            parts.append(text if key == "non_field_errors" else f"{key}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return "; ".join(_flatten(item) for item in detail)
    return str(detail)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, reshaped to the contract's ``{"error": {"code", "message"}}``."""
    refusal = exc if isinstance(exc, ApiError) else unavailable(exc)
    if refusal is not None:
        return Response(refusal.api_body(), status=refusal.status, headers=refusal.headers)
    if isinstance(exc, drf_exceptions.ParseError) and not isinstance(exc, InvalidJson):
        exc = InvalidJson(f"Malformed JSON body: {exc.detail}")
    from rest_framework.views import exception_handler  # imports our auth class: keep lazy

    response = exception_handler(exc, context)
    if response is None:
        return None
    status = response.status_code
    detail = exc.detail if isinstance(exc, drf_exceptions.APIException) else str(exc)
    code = "invalid_json" if isinstance(exc, InvalidJson) else _DRF_CODES.get(status)
    if code is None:  # a status DRF's own exceptions never use: its code, in snake_case
        code = getattr(exc, "default_code", None) or "internal_error"
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        status = 401
        code = "unauthorized"
    response.status_code = status
    # An exception with an empty detail (the 404 of ``?format=`` naming no renderer): its
    # default message, or the status's phrase; the contract's message is never empty.
    message = _flatten(detail) or str(getattr(exc, "default_detail", "")) or _phrase(status)
    response.data = {"error": {"code": code, "message": message}}
    return response


def _phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return f"{HTTPStatus(status).phrase}."
    except ValueError:
        return f"HTTP {status}."

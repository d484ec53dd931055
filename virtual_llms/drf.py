"""DRF glue: bearer-token authentication, role permission and the contract's error shape
for every DRF view (``{"error": {"code", "message"}}``)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions, negotiation, permissions
from rest_framework import exceptions as drf_exceptions
from rest_framework.request import Request
from rest_framework.response import Response

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


class JsonOnly(negotiation.BaseContentNegotiation):
    """/api/ answers JSON whatever the request's Accept header says (PROTOCOL.md v1.1): a
    publisher whose HTTP client also accepts ``text/event-stream`` gets its 401, not a 406.
    Bodies are read by http.read_json, whatever their Content-Type."""

    def select_parser(self, request: Request, parsers: Any) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: Any, format_suffix: str | None = None
    ) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


class HasRole(permissions.BasePermission):
    """DRF permission: the token's role is one of ``view.roles`` (403 otherwise)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        token = request.auth
        if not isinstance(token, ApiToken):
            raise exceptions.NotAuthenticated("Missing bearer token (Authorization: Bearer …).")
        require_role(token, getattr(view, "roles", ()))
        return True


_DRF_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
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
    if isinstance(exc, drf_exceptions.ParseError):
        exc = drf_exceptions.ParseError(f"Malformed JSON body: {exc.detail}")
    from rest_framework.views import exception_handler  # imports our auth class: keep lazy

    response = exception_handler(exc, context)
    if response is None:
        return None
    status = response.status_code
    detail = exc.detail if isinstance(exc, drf_exceptions.APIException) else str(exc)
    code = _DRF_CODES.get(status, "error")
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        status = 401
        code = "unauthorized"
    response.status_code = status
    response.data = {"error": {"code": code, "message": _flatten(detail)}}
    return response

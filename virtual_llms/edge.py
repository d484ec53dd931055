"""Every refusal Django itself makes on /api/ and /v1/ (400, 403, 404, 413, 500, under DEBUG
too) answered as the contract's JSON error; the admin keeps Django's pages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import (
    BadRequest,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
)
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase
from django.views import csrf, defaults
from django.views.decorators.csrf import csrf_exempt

from .errors import ApiError, unavailable
from .http import internal_error

log = logging.getLogger("mcpd.http")

API_PREFIXES = ("/api/", "/v1/")


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIXES) or request.path in ("/api", "/v1")


def _api_response(request: HttpRequest, error: ApiError) -> HttpResponse:
    return error.response(openai=request.path.startswith("/v1"))


def refusal(exc: BaseException) -> ApiError | None:
    """The contract's error for an exception Django (or a library under it) raises on bad
    input, or a service being away; None for anything else (a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Http404):
        return ApiError(404, "not_found", "Not found.")
    if isinstance(exc, PermissionDenied):
        return ApiError(403, "forbidden", "Permission denied.")
    if isinstance(exc, RequestDataTooBig):
        return ApiError(413, "payload_too_large", "The request body is too large.")
    if isinstance(exc, SuspiciousOperation | BadRequest | MultiPartParserError):
        # DisallowedHost, a bad multipart body, too many fields, ...: as Django logs it
        logging.getLogger(f"django.security.{type(exc).__name__}").warning("%s", exc)
        return ApiError(400, "invalid_request", f"Bad request: {type(exc).__name__}.")
    return unavailable(exc)


def exception_response(request: HttpRequest, exc: Exception) -> HttpResponseBase:
    """The JSON answer to an exception that left a view on /api/ or /v1/: also under DEBUG,
    where Django would render its technical pages (which bypass the handlers below)."""
    error = refusal(exc)
    if error is None:
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        error = internal_error()
    error.__traceback__ = None  # see http.json_view
    return _api_response(request, error)


GetResponse = Callable[[HttpRequest], Any]


def json_exceptions(get_response: GetResponse) -> GetResponse:
    """Wrap the API handler's ``get_response`` so no exception reaches Django's
    ``response_for_exception`` (runtime/django_asgi.py ApiASGIHandler)."""
    if iscoroutinefunction(get_response):

        async def inner(request: HttpRequest) -> HttpResponseBase:
            try:
                response: HttpResponseBase = await get_response(request)
            except Exception as exc:
                return exception_response(request, exc)
            return response

        return inner

    def inner_sync(request: HttpRequest) -> HttpResponseBase:
        try:
            response: HttpResponseBase = get_response(request)
        except Exception as exc:
            return exception_response(request, exc)
        return response

    return inner_sync


def malformed_request(path: str, status: int) -> HttpResponse:
    """Django's answer to a request it cannot even build (ASGIHandler.create_request: a
    path or header that is not UTF-8, 400; a body over DATA_UPLOAD_MAX_MEMORY_SIZE, 413)."""
    if status == 413:
        error = ApiError(413, "payload_too_large", "The request body is too large.")
    else:
        error = ApiError(400, "invalid_request", "The request's path or headers are malformed.")
    return error.response(openai=path.startswith("/v1"))


@csrf_exempt
def no_route(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Every path under /api/ and /v1/ that no route takes, whatever the method (also under
    DEBUG, where Django's 404 page would skip handler404)."""
    return _api_response(request, ApiError(404, "not_found", f"No route {request.path}."))


# --- Django's error handlers (mcpd_site/urls.py) and CSRF failure view (settings.py) ------


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """handler400: JSON in the contract's shapes for the API, Django's page for the admin."""
    if is_api(request):
        return _api_response(request, ApiError(400, "invalid_request", "Bad request."))
    return defaults.bad_request(request, exception or Exception())


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """handler403."""
    if is_api(request):
        return _api_response(request, ApiError(403, "forbidden", "Permission denied."))
    return defaults.permission_denied(request, exception or Exception())


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """handler404."""
    if is_api(request):
        return no_route(request)
    return defaults.page_not_found(request, exception or Exception())


def server_error(request: HttpRequest) -> HttpResponseBase:
    """handler500."""
    if is_api(request):
        return _api_response(request, internal_error())
    return defaults.server_error(request)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponseBase:
    """CSRF_FAILURE_VIEW: the API takes no cookies (bearer tokens), so a CSRF refusal there
    can only be a misrouted request; it gets the contract's 403 all the same."""
    if is_api(request):
        return _api_response(request, ApiError(403, "forbidden", f"CSRF check failed: {reason}"))
    return csrf.csrf_failure(request, reason)

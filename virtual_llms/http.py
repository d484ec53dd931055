"""Small helpers shared by the plain async views (streams.py, views.py)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from . import jsonio
from .errors import ApiError, unavailable

log = logging.getLogger("mcpd.http")

AsyncView = Callable[..., Awaitable[HttpResponseBase]]


def is_openai_path(request: HttpRequest) -> bool:
    return request.path.startswith("/v1/")


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "The broker failed on this request; it was logged.")


def json_view(*methods: str) -> Callable[[AsyncView], Any]:
    """An async endpoint that answers in the contract's error shape: a wrong method is a JSON
    405, an ApiError its own status, and anything unexpected a logged 500 (never HTML)."""

    def decorate(view: AsyncView) -> Any:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            openai = is_openai_path(request)
            if request.method not in methods:
                error = ApiError(
                    405, "method_not_allowed", f"Use {' or '.join(methods)} on {request.path}."
                )
                response = error.response(openai=openai)
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return await view(request, *args, **kwargs)
            except ApiError as exc:
                # An expected refusal needs no traceback, and one raised in sync_to_async
                # keeps a cycle (traceback -> asgiref's frame -> its Future -> the error)
                # that holds this request until a full gc pass.
                exc.__traceback__ = None
                return exc.response(openai=openai)
            except Exception as exc:
                refusal = unavailable(exc)
                if refusal is not None:
                    return refusal.response(openai=openai)
                log.exception("%s %s failed", request.method, request.path)
                return internal_error().response(openai=openai)

        return csrf_exempt(wrapper)  # bearer tokens, no cookies: nothing to forge

    return decorate


def read_json(request: HttpRequest, *, empty: Any = None) -> Any:
    """The request's JSON body, or ApiError 413 (too big) / 400 (not JSON); ``empty`` for an
    empty body, if not None (else 400)."""
    limit = settings.MCPD_MAX_BODY_BYTES
    declared = request.META.get("CONTENT_LENGTH") or "0"
    too_big = ApiError(413, "payload_too_large", f"The request body is larger than {limit} bytes.")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    try:
        raw = request.body
    except Exception as exc:  # RequestDataTooBig and friends
        raise too_big from exc
    if len(raw) > limit:
        raise too_big
    if not raw:
        if empty is not None:
            return empty
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        return jsonio.loads(raw, settings.MCPD_MAX_JSON_DEPTH)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"Malformed JSON body: {exc}") from None


def read_json_object(
    request: HttpRequest, *, empty: dict[str, Any] | None = None
) -> dict[str, Any]:
    body = read_json(request, empty=empty)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    return body

"""Small helpers shared by the plain async views (streams.py, views.py)."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from .errors import ApiError


def read_json(request: HttpRequest) -> Any:
    """The request's JSON body, or ApiError 413 (too big) / 400 (not JSON)."""
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
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"Malformed JSON body: {exc}") from exc


def read_json_object(request: HttpRequest) -> dict[str, Any]:
    body = read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    return body

"""Public LLMs: requests proxied to an OpenAI-compatible upstream with httpx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from . import crypto, jsonio
from .errors import ApiError
from .models import Llm

_clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        for old in [lp for lp in _clients if lp.is_closed()]:
            del _clients[old]
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        )
        _clients[loop] = client
    return client


def _timeout() -> httpx.Timeout:
    # The same bound as a virtual LLM's: the wait for the first byte and between chunks.
    return httpx.Timeout(settings.MCPD_INFER_TIMEOUT_SECONDS, connect=10.0)


def _upstream_error(exc: httpx.HTTPError, row: Llm) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, "timeout", f"The upstream of '{row.name}' did not answer in time.")
    return ApiError(
        502, "upstream_unreachable", f"The upstream of '{row.name}' is unreachable: {exc}"
    )


async def forward(
    row: Llm, endpoint: str, body: dict[str, Any], streaming: bool, headers: dict[str, str]
) -> HttpResponseBase:
    """Send the client's body to ``<row.url><endpoint minus /v1>`` with the row's model."""
    url = row.url.rstrip("/") + endpoint.removeprefix("/v1")
    request_headers = {"Content-Type": "application/json"}
    api_key = crypto.decrypt(row.api_key_encrypted)
    if api_key:
        request_headers["Authorization"] = f"Bearer {api_key}"
    payload = jsonio.dumps({**body, "model": row.model})
    client = _client()
    request = client.build_request(
        "POST", url, content=payload, headers=request_headers, timeout=_timeout()
    )
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _upstream_error(exc, row) from exc
    content_type = upstream.headers.get("content-type", "application/json")
    if not streaming or upstream.status_code >= 300:
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, row) from exc
        finally:
            await upstream.aclose()
        response = HttpResponse(content, status=upstream.status_code, content_type=content_type)
        for key, value in headers.items():
            response[key] = value
        return response

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            error = _upstream_error(exc, row)
            yield f"data: {json.dumps(error.openai_body())}\n\n".encode()
        finally:
            await upstream.aclose()

    streamed = StreamingHttpResponse(
        relay(), status=upstream.status_code, content_type=content_type
    )
    streamed["Cache-Control"] = "no-cache"
    streamed["X-Accel-Buffering"] = "no"
    for key, value in headers.items():
        streamed[key] = value
    return streamed

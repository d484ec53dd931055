"""Public LLMs: requests proxied to an OpenAI-compatible upstream with httpx."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from . import crypto, jsonio
from .errors import ApiError
from .loopcache import PerLoop
from .models import Llm

_clients: PerLoop[httpx.AsyncClient] = PerLoop()


def _client() -> httpx.AsyncClient:
    return _clients.get(
        lambda: httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        )
    )


def _timeout() -> httpx.Timeout:
    # The same bound as a virtual LLM's: the wait for the first byte and between chunks.
    return httpx.Timeout(settings.MCPD_INFER_TIMEOUT_SECONDS, connect=10.0)


def _upstream_error(exc: httpx.HTTPError, row: Llm) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, "timeout", f"The upstream of '{row.name}' did not answer in time.")
    return ApiError(
        502, "upstream_unreachable", f"The upstream of '{row.name}' is unreachable: {exc}"
    )


@dataclass
class Upstream:
    """The upstream's answer: its status and content type, and its body, whole (``content``)
    or streamed (``streaming``: read it with :meth:`body`)."""

    row: Llm
    status: int
    content_type: str
    response: httpx.Response
    content: bytes | None = None

    @property
    def streaming(self) -> bool:
        return self.content is None

    async def body(self) -> AsyncGenerator[bytes, None]:
        if self.content is not None:
            yield self.content
            return
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            error = _upstream_error(exc, self.row)
            yield f"data: {jsonio.dumps_str(error.openai_body())}\n\n".encode()
        finally:
            await self.response.aclose()


async def forward(row: Llm, endpoint: str, body: dict[str, Any], streaming: bool) -> Upstream:
    """Send the client's body to ``<row.url><endpoint minus /v1>`` with the row's model. A
    streamed call's answer is passed on as it comes, unless the upstream refused it (a
    status of 300 or more: read whole)."""
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
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _upstream_error(exc, row) from exc
    content_type = response.headers.get("content-type", "application/json")
    answer = Upstream(row, response.status_code, content_type, response)
    if not streaming or response.status_code >= 300:
        try:
            answer.content = await response.aread()
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, row) from exc
        finally:
            await response.aclose()
    return answer

"""One ``infer`` task: the client's body to the upstream's same endpoint, the answer back.

A non-streamed answer goes back as one ``result`` with the upstream's status and body (an
upstream 400 stays a 400). A streamed answer is read as SSE and each event's data is
forwarded as a chunk while it arrives (see :mod:`.batcher`); the upstream's ``[DONE]`` ends
it, and one is added if the upstream ends without it. An upstream that refuses before
streaming gets a ``result`` with its status and body; one that cannot be reached, times out
or breaks mid-stream gets an ``error`` whose message says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
from httpx_sse import EventSource, ServerSentEvent

from .. import jsonio
from .batcher import Chunk, ChunkBatcher
from .broker import MAX_MESSAGE
from .config import LlmConfig
from .transport import Client

# The endpoints of PROTOCOL.md; nothing else is ever called on the upstream.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
DONE = "[DONE]"
# How long a streamed answer's body may go on after [DONE] before its connection is dropped.
DRAIN_SECONDS = 1.0


class Sink(Protocol):
    async def result(self, status: int, body: Any) -> None: ...
    async def chunks(self, chunks: list[Chunk]) -> None: ...
    async def error(self, message: str) -> None: ...


def upstream_url(llm: LlmConfig, endpoint: str) -> str:
    """``/v1/chat/completions`` on ``http://host:8000/v1`` is ``http://host:8000/v1/chat/completions``
    (the same rule as the broker's public LLMs)."""
    return llm.upstream + endpoint.removeprefix("/v1")


def upstream_headers(llm: LlmConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {llm.api_key}"} if llm.api_key else {}


def describe(exc: BaseException) -> str:
    """A short human reason for a transport failure."""
    text = str(exc).strip()
    return text or type(exc).__name__


def transport_failure(llm: LlmConfig, url: str, exc: httpx.HTTPError, *, streaming: bool) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"upstream of '{llm.name}' is unreachable at {url}: {describe(exc)}"
    if isinstance(exc, httpx.TimeoutException):
        what = "sent nothing" if streaming else "did not answer"
        return f"upstream of '{llm.name}' {what} for {llm.timeout_seconds:g} s ({url})"
    return f"upstream of '{llm.name}' failed at {url}: {describe(exc)}"


def error_body(status: int, raw: bytes) -> Any:
    """The upstream's JSON body; anything else wrapped in OpenAI's error shape."""
    try:
        return json.loads(raw)
    except ValueError:
        text = raw.decode(errors="replace").strip()[:MAX_MESSAGE]  # a page of HTML, say
        return {
            "error": {
                "message": text or httpx.codes.get_reason_phrase(status) or f"HTTP {status}",
                "type": "upstream_error",
                "code": status,
            }
        }


def _is_event_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("text/event-stream")


async def forward(http: Client, llm: LlmConfig, frame: dict[str, Any], sink: Sink) -> str:
    """Run one infer task to its end; returns a short summary for the log. Raises what the
    sink raises (a task the broker forgot: stop at once)."""
    endpoint = frame.get("endpoint")
    body = frame.get("body")
    streaming = frame.get("streaming") is True
    if endpoint not in ENDPOINTS or not isinstance(body, dict):
        return await _fail(sink, f"this publisher does not serve {endpoint!r} with that body")
    url = upstream_url(llm, str(endpoint))
    headers = upstream_headers(llm)
    timeout = httpx.Timeout(llm.timeout_seconds, connect=10.0)
    if not streaming:
        try:
            reply = await http.post_json(url, headers=headers, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            return await _fail(sink, transport_failure(llm, url, exc, streaming=False))
        return await _answer(llm, reply.status_code, reply.content, sink)
    try:
        response = await http.direct("POST", url, headers=headers, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        return await _fail(sink, transport_failure(llm, url, exc, streaming=True))
    try:
        if response.status_code < 400 and _is_event_stream(response):
            return await _relay_stream(llm, url, response, sink)
        try:
            raw = await response.aread()
        except httpx.HTTPError as exc:
            return await _fail(sink, transport_failure(llm, url, exc, streaming=False))
        # A streamed call the upstream answered in one piece goes back as such; the broker
        # turns a 2xx result into one stream event and [DONE].
        return await _answer(llm, response.status_code, raw, sink)
    finally:
        await response.aclose()


async def _fail(sink: Sink, message: str) -> str:
    """The task fails with ``message``, which is also its summary for the log."""
    await sink.error(message)
    return message


async def _answer(llm: LlmConfig, status: int, raw: bytes, sink: Sink) -> str:
    """The upstream's whole answer as the task's result (an upstream error keeps its status
    and body)."""
    if status < 400:
        try:
            answer = jsonio.loads(raw)
        except ValueError:
            return await _fail(
                sink, f"upstream of '{llm.name}' answered {status} with a body that is not JSON"
            )
    else:
        answer = error_body(status, raw)
    await sink.result(status, answer)
    return f"{status}"


async def _drain(events: AsyncIterator[ServerSentEvent]) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the body), so that the
    connection goes back to the pool instead of being closed: one TCP connection per stream
    otherwise. An upstream that keeps the body open after ``[DONE]`` gets
    :data:`DRAIN_SECONDS`; the client already has its ``[DONE]``."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in events:
                pass


async def _relay_stream(llm: LlmConfig, url: str, response: httpx.Response, sink: Sink) -> str:
    batcher = ChunkBatcher(sink.chunks)
    failure: str | None = None
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(batcher.run())
            events = EventSource(response).aiter_sse()
            try:
                async for event in events:
                    if event.data == DONE:
                        break
                    batcher.put(event.data)
                batcher.put(DONE, done=True)
            except httpx.HTTPError as exc:
                failure = transport_failure(llm, url, exc, streaming=True)
                batcher.close()  # what arrived before the failure still goes out, in order
            if failure is None:
                await _drain(events)
    except* Exception as group_error:
        raise group_error.exceptions[0] from None
    if failure is not None:
        await sink.error(failure)
        return f"{response.status_code} stream broken after {batcher.chunks} chunks: {failure}"
    return f"{response.status_code} stream: {batcher.chunks} chunks in {batcher.posts} batches"

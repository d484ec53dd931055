"""Long-lived HTTP, as plain Django async views: the publisher's SSE control stream and the
client's OpenAI-compatible calls (relayed by inference.py).

A streamed body is an async generator; Django (>= 5.0) cancels it when the client
disconnects (DESIGN.md pitfall 1). Each generator is run to its first chunk before the
response is returned: a generator that never started would never run its ``finally:``, and
the cleanup there (unbind, cancel, the call's outcome) must always happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from . import backpressure, binding, inference, selectors, services, sse
from .auth import CLIENT_ROLES, PUBLISHER_ROLES, aauthenticate, authenticate
from .errors import ApiError, unavailable
from .http import json_view
from .hub import Closing, ControlStream
from .models import Llm
from .protocol import Frame

log = logging.getLogger("mcpd.streams")


def task_frame_event(frame: Frame) -> bytes:
    return sse.event("task", frame, frame["taskId"])


async def prestarted(agen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Run ``agen`` to its first chunk now and return a generator of all its chunks. Once
    started, the event loop finalises it (running its ``finally:``) even if the response is
    dropped before Django iterates it."""
    head = await anext(agen)

    async def chained() -> AsyncIterator[bytes]:
        try:
            yield head
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()  # type: ignore[attr-defined]  # an async generator

    return chained()


def _sse_response(body: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(body, content_type=sse.CONTENT_TYPE)
    for key, value in sse.HEADERS.items():
        response[key] = value
    return response


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even if the caller is being cancelled again."""
    try:
        await asyncio.shield(coro)
    except Exception as exc:
        if unavailable(exc) is None:
            log.exception("cleanup failed")
        else:  # the outage is logged once, by the hub
            log.warning("cleanup failed: %s: %s", type(exc).__name__, exc)


# --- the publisher's control stream (SSE) ---------------------------------------------------

# What the publisher is told as its stream ends, when there is something to tell.
CLOSING_EVENTS: dict[Closing, tuple[str, dict[str, str]]] = {
    Closing.RECONNECT: ("reconnect", {"reason": "draining"}),
    Closing.REPLACED: (
        "replaced",
        {"reason": "replaced", "message": "another stream holds this session now"},
    ),
}


def _stream_owner(header: str | None, session_id: str) -> int:
    token = authenticate(header, PUBLISHER_ROLES)
    services.session_get_owned(token=token, session_id=session_id)
    return token.pk


@json_view("GET")
async def control_stream(request: HttpRequest, session_id: str) -> HttpResponseBase:
    token_id = await sync_to_async(_stream_owner)(request.headers.get("Authorization"), session_id)
    stream = ControlStream(session_id, token_id)
    backpressure.hold_control_stream(request.scope)  # type: ignore[attr-defined]  # ASGIRequest
    return _sse_response(await prestarted(_control_events(stream)))


async def _control_events(stream: ControlStream) -> AsyncIterator[bytes]:
    try:
        await binding.stream_open(stream)
        yield sse.event("ready", {"providerSessionId": stream.session_id})
        async for frame in binding.stream_frames(stream):
            yield sse.PING if frame is None else task_frame_event(frame)
        signal = CLOSING_EVENTS.get(stream.why)
        if signal is not None:
            yield sse.event(*signal)
    finally:
        await _shielded(binding.stream_close(stream))


# --- the client API (OpenAI-compatible) -----------------------------------------------------


def _model_object(row: Llm) -> dict[str, Any]:
    return {
        "id": row.name,
        "object": "model",
        "created": int(row.created_at.timestamp()),
        "owned_by": f"mcpd:{row.kind}",
    }


@json_view("GET")
async def list_models(request: HttpRequest) -> HttpResponseBase:
    await aauthenticate(request.headers.get("Authorization"), CLIENT_ROLES)
    rows = await sync_to_async(lambda: list(selectors.llm_list_callable()))()
    return JsonResponse({"object": "list", "data": [_model_object(row) for row in rows]})


@json_view("GET")
async def retrieve_model(request: HttpRequest, name: str) -> HttpResponseBase:
    """``GET /v1/models/<name>``: the model object ``/v1/models`` lists for it."""
    await aauthenticate(request.headers.get("Authorization"), CLIENT_ROLES)
    row = await sync_to_async(selectors.llm_callable_get)(name=name)
    if row is None:
        raise ApiError(404, "model_not_found", f"The model '{name}' does not exist.")
    return JsonResponse(_model_object(row))


async def _body(items: AsyncGenerator[inference.Head | bytes, None]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(items):
        async for chunk in items:
            assert isinstance(chunk, bytes)
            yield chunk


def relayed(endpoint: str) -> Any:
    """The view of one relayed endpoint (inference.ENDPOINTS)."""

    @json_view("POST")
    async def view(request: HttpRequest) -> HttpResponseBase:
        items = inference.relay(request, endpoint)
        try:
            head = await anext(items)
            assert isinstance(head, inference.Head)
            response: HttpResponseBase
            if head.streaming:
                response = StreamingHttpResponse(
                    _body(items), status=head.status, content_type=head.content_type
                )
            else:
                # Read to its end, so the call's outcome is recorded before the answer goes.
                content = b"".join([chunk async for chunk in _body(items)])
                response = HttpResponse(content, status=head.status, content_type=head.content_type)
        except BaseException:
            await items.aclose()
            raise
        for key, value in head.headers.items():
            response[key] = value
        return response

    return view

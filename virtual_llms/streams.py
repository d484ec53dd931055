"""Long-lived HTTP: the publisher's SSE control stream and the client's inference calls.

Both are plain Django async views. A streamed body is an async generator; Django (>= 5.0)
cancels it when the client disconnects (DESIGN.md pitfall 1). Each generator is run to its
first chunk before the response is returned (``prestarted``): a generator that never started
would never run its ``finally:``, and the cleanup there (unbind, cancel) must always happen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from . import jsonio, proxy, relay, selectors, services
from .auth import CLIENT_ROLES, PUBLISHER_ROLES, aauthenticate, authenticate
from .errors import ApiError
from .http import internal_error, json_view, read_json_object
from .models import LlmKind, LlmStatus

log = logging.getLogger("mcpd.streams")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"


def _sse(event: str | None, data: Any, event_id: str | None = None) -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {jsonio.dumps_line(data)}")
    return ("\n".join(lines) + "\n\n").encode()


def _data(text: str) -> bytes:
    # One SSE event; a payload with newlines becomes several data lines of one event.
    return ("".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def task_frame_event(frame: dict[str, Any]) -> bytes:
    return _sse("task", frame, frame["taskId"])


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
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    for key, value in SSE_HEADERS.items():
        response[key] = value
    return response


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even if the caller is being cancelled again."""
    try:
        await asyncio.shield(coro)
    except Exception:
        log.exception("cleanup failed")


# --- the publisher's control stream (SSE) ---------------------------------------------------


def _stream_owner(header: str | None, session_id: str) -> int:
    token = authenticate(header, PUBLISHER_ROLES)
    services.session_get_owned(token=token, session_id=session_id)
    return token.pk


@json_view("GET")
async def control_stream(request: HttpRequest, session_id: str) -> HttpResponseBase:
    token_id = await sync_to_async(_stream_owner)(request.headers.get("Authorization"), session_id)
    stream = relay.ControlStream(session_id, token_id)
    return _sse_response(await prestarted(_control_events(stream)))


async def _control_events(stream: relay.ControlStream) -> AsyncIterator[bytes]:
    try:
        await relay.stream_open(stream)
        yield _sse("ready", {"providerSessionId": stream.session_id})
        async for frame in relay.stream_frames(stream):
            yield PING if frame is None else task_frame_event(frame)
    finally:
        await _shielded(relay.stream_close(stream))


# --- the client API (OpenAI-compatible) -----------------------------------------------------


@json_view("GET")
async def list_models(request: HttpRequest) -> HttpResponseBase:
    await aauthenticate(request.headers.get("Authorization"), CLIENT_ROLES)
    rows = await sync_to_async(lambda: list(selectors.llm_list_callable()))()
    data = [
        {
            "id": row.name,
            "object": "model",
            "created": int(row.created_at.timestamp()),
            "owned_by": f"mcpd:{row.kind}",
        }
        for row in rows
    ]
    return JsonResponse({"object": "list", "data": data})


def _server_timing(broker_s: float, publisher_s: float | None = None) -> str:
    parts = [f'mcpd;dur={broker_s * 1000:.2f};desc="broker"']
    if publisher_s is not None:
        parts.append(f'upstream;dur={publisher_s * 1000:.2f};desc="publisher"')
    return ", ".join(parts)


def _endpoint(path: str) -> Any:
    @json_view("POST")
    async def view(request: HttpRequest) -> HttpResponseBase:
        return await _infer(request, path)

    return view


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "missing_model", "'model' is required: the name of an LLM.")
    return name


def _streaming(body: dict[str, Any]) -> bool:
    flag = body.get("stream", False)
    if flag is not None and not isinstance(flag, bool):
        raise ApiError(400, "invalid_request", "'stream' must be a boolean.")
    return bool(flag)


async def _infer(request: HttpRequest, endpoint: str) -> HttpResponseBase:
    started = time.perf_counter()
    # A missing token wins over a bad body, and a bad body over an unknown model.
    await aauthenticate(request.headers.get("Authorization"), CLIENT_ROLES)
    body = read_json_object(request)
    name = _model_name(body)
    streaming = _streaming(body)
    # The common request is sent right here; anything else is looked up the long way.
    opened = await relay.open_cached(name, body, streaming, endpoint)
    row, presence = opened.row, None
    if opened.pending is None:
        row, presence = await relay.llm_lookup(name, opened.checked)
    if row is None:
        raise ApiError(404, "model_not_found", f"The model '{name}' does not exist.")
    if row.kind == LlmKind.PUBLIC:
        return await proxy.forward(
            row,
            endpoint,
            body,
            streaming,
            {"Server-Timing": _server_timing(time.perf_counter() - started)},
        )
    ref = relay.ref_of(row)
    answer = _stream if streaming else _unary
    return await answer(ref, body, endpoint, started, presence, opened.pending)


async def _unary(
    ref: relay.LlmRef,
    body: dict[str, Any],
    endpoint: str,
    started: float,
    presence: relay.Presence | None,
    pending: relay.Pending | None = None,
) -> HttpResponseBase:
    """A non-streamed answer; ``pending``: the task, if it was sent already (open_cached)."""
    headers: dict[str, str] = {}
    woke = 0.0
    if pending is None:
        pending, woke = await relay.enqueue_infer(ref, body, False, endpoint, presence)
    if woke:
        headers["X-Mcpd-Wake"] = f"woke;dur={woke * 1000:.0f}"
    sent = time.perf_counter()
    try:
        event = await relay.next_event(pending, settings.MCPD_INFER_TIMEOUT_SECONDS)
    except BaseException:
        await _shielded(relay.abandon(pending))
        raise
    waited = time.perf_counter() - sent
    await relay.finish(pending)
    if event["kind"] == "error":
        raise ApiError(event["status"], event["code"], event["message"])
    if event["kind"] != "result":
        await _shielded(relay.abandon(pending))
        raise ApiError(
            502,
            "publisher_protocol_error",
            "The publisher streamed an answer to a non-streaming call.",
        )
    response = HttpResponse(event["json"], status=event["status"], content_type="application/json")
    broker = time.perf_counter() - started - waited - woke
    response["Server-Timing"] = _server_timing(broker, waited)
    for key, value in headers.items():
        response[key] = value
    return response


async def _stream(
    ref: relay.LlmRef,
    body: dict[str, Any],
    endpoint: str,
    started: float,
    presence: relay.Presence | None,
    pending: relay.Pending | None = None,
) -> HttpResponseBase:
    """A streamed answer. The status line is held back while an error can still get its own
    status (the contract's table), for up to one ping interval; a wait longer than that (a
    slow wake, a slow first token) commits to ``200 text/event-stream`` and comments keep the
    line open, so proxies that cut quiet connections never see 15 s of silence. ``pending``:
    the task, if it was sent already (open_cached)."""
    loop = asyncio.get_running_loop()
    window_end = loop.time() + settings.MCPD_PING_SECONDS
    headers: dict[str, str] = {}
    if ref.status == LlmStatus.HIBERNATING:
        await relay.require_stream(ref)
        wake = asyncio.ensure_future(relay.ensure_awake(ref))
        try:
            await asyncio.wait({wake}, timeout=settings.MCPD_PING_SECONDS)
        except BaseException:
            wake.cancel()
            raise
        if not wake.done():
            return _sse_response(await prestarted(_stream_events(ref, body, endpoint, wake=wake)))
        headers["X-Mcpd-Wake"] = f"woke;dur={wake.result() * 1000:.0f}"
        ref = dataclasses.replace(ref, status=LlmStatus.ACTIVE)
        presence = None  # looked up again after the wake
    if pending is None:
        pending, _ = await relay.enqueue_infer(ref, body, True, endpoint, presence)
    deadline = loop.time() + settings.MCPD_INFER_TIMEOUT_SECONDS
    try:
        first = await _next_or_none(pending, max(0.0, min(window_end, deadline) - loop.time()))
        if first is None and loop.time() >= deadline:
            raise relay.silence_error()
        if first is not None and _refusal(first):
            await relay.finish(pending)
            if first["kind"] == "error":
                raise ApiError(first["status"], first["code"], first["message"])
            return HttpResponse(
                first["json"], status=first["status"], content_type="application/json"
            )
        events = _stream_events(
            ref, body, endpoint, pending=pending, first=first, deadline=deadline
        )
        response = _sse_response(await prestarted(events))
    except BaseException:
        await _shielded(relay.abandon(pending))
        raise
    response["Server-Timing"] = _server_timing(time.perf_counter() - started)
    for key, value in headers.items():
        response[key] = value
    return response


async def _next_or_none(pending: relay.Pending, timeout: float) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(timeout):
            event = await pending.queue.get()
    except TimeoutError:
        return None
    pending.got_data = True
    return event


def _refusal(event: dict[str, Any]) -> bool:
    """An error, or an upstream's non-2xx answer: it reaches a streaming client as its own
    status and body instead of a stream."""
    return event["kind"] == "error" or (
        event["kind"] == "result" and not 200 <= event["status"] < 300
    )


def as_stream_chunk(body: Any) -> Any:
    """A whole chat.completion as one chat.completion.chunk, for a client that asked for a
    stream from an upstream that answered in one piece. Other bodies (text completions have
    the same shape either way) pass as they are."""
    if not isinstance(body, dict) or body.get("object") != "chat.completion":
        return body
    choices = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        delta = (
            {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else {}
        )
        choices.append(
            {
                "index": choice.get("index", 0),
                "delta": delta,
                "finish_reason": choice.get("finish_reason"),
            }
        )
    chunk = {k: v for k, v in body.items() if k not in ("choices", "object")}
    return {**chunk, "object": "chat.completion.chunk", "choices": choices}


def _error_data(exc: ApiError) -> bytes:
    return _sse(None, exc.openai_body())


async def _stream_events(
    ref: relay.LlmRef,
    body: dict[str, Any],
    endpoint: str,
    *,
    pending: relay.Pending | None = None,
    first: dict[str, Any] | None = None,
    deadline: float = 0.0,
    wake: asyncio.Future[float] | None = None,
) -> AsyncIterator[bytes]:
    """The client's SSE body, after a wait outlasted the ping interval: either a wake still
    under way (``wake``) or a task sent (``pending``, with its ``first`` event if one came).
    Its first chunk comes at once, and it always ends with ``data: [DONE]`` or an error
    event."""
    loop = asyncio.get_running_loop()
    finished = False
    timeout = settings.MCPD_INFER_TIMEOUT_SECONDS
    try:
        if wake is not None:
            yield f": waking {ref.name}\n\n".encode()
            try:
                while not wake.done():
                    await asyncio.wait({wake}, timeout=settings.MCPD_PING_SECONDS)
                    if not wake.done():
                        yield PING
            finally:
                if not wake.done():
                    wake.cancel()
            woke = wake.result()
            yield f": mcpd woke {ref.name} in {woke:.3f} s\n\n".encode()
            pending, _ = await relay.enqueue_infer(
                dataclasses.replace(ref, status=LlmStatus.ACTIVE), body, True, endpoint
            )
            deadline = loop.time() + timeout
        elif first is None:
            yield PING  # a ping interval passed in silence already
        assert pending is not None
        event = first
        while True:
            if event is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise relay.silence_error()
                event = await _next_or_none(pending, min(settings.MCPD_PING_SECONDS, remaining))
                if event is None:
                    yield PING
                    continue
            deadline = loop.time() + timeout
            kind = event["kind"]
            if kind == "error":
                finished = True
                raise ApiError(event["status"], event["code"], event["message"])
            if kind == "result":
                finished = True
                body = relay.result_body(event)
                if 200 <= event["status"] < 300:
                    # An upstream that ignored "stream": one chunk, then [DONE].
                    yield _data(jsonio.dumps_line(as_stream_chunk(body)))
                    yield b"data: [DONE]\n\n"
                    return
                error = body.get("error") if isinstance(body, dict) else None
                message = error.get("message") if isinstance(error, dict) else None
                raise ApiError(502, "upstream_error", str(message or body))
            out = []
            for chunk in event["chunks"]:
                if chunk["data"]:
                    out.append(_data(chunk["data"]))
                if chunk["done"]:
                    finished = True
                    if chunk["data"] != "[DONE]":
                        out.append(b"data: [DONE]\n\n")
                    break
            yield b"".join(out)
            if finished:
                return
            event = None
    except ApiError as exc:
        yield _error_data(exc)
    except Exception:
        log.exception("relaying a stream of %s failed", ref.name)
        yield _error_data(internal_error())
    finally:
        if pending is not None:
            if finished:
                await _shielded(relay.finish(pending))
            else:
                await _shielded(relay.abandon(pending))


chat_completions = _endpoint("/v1/chat/completions")
completions = _endpoint("/v1/completions")
embeddings = _endpoint("/v1/embeddings")

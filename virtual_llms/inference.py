"""The inference orchestrator: every client call (virtual or public, streamed or not, woken or
not) goes through :func:`relay`, which ends in one place and reports an :class:`Outcome`.

:func:`relay` is an async generator: it yields the response's :class:`Head` (status and
headers) once, then its body. For a streamed call the head is held back while an error can
still get its own status (the contract's table), for up to one ping interval; a longer wait
(a slow wake, a slow first token) commits to ``200 text/event-stream``, and comments keep the
line open, so proxies that cut quiet connections never see 15 s of silence. Whatever ends
the call — an answer, an error, a timeout, the client leaving — its ``finally:`` records
the outcome once, for the observers (metrics, the request log, usage records).

One file, past 600 lines, on purpose: the call's stages (admission, wake, queue, dispatch,
failover, the streamed and unary answers) share one ``_Call`` and one ``finally:``; split
across modules, the one place a call ends would become several. What each stage needs from
elsewhere lives there (wake.py, queue.py, routing.py, limits.py, tasks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from . import jsonio, limits, proxy, queue, rowcache, sse, tasks, usage
from .answers import result_body
from .auth import CLIENT_ROLES, aauthenticate
from .errors import ApiError, offline, unavailable
from .http import internal_error, read_json_object
from .hub import Pending, get_hub
from .models import Llm, LlmStatus
from .protocol import TaskEvent, error_of
from .rowcache import CachedRow, LlmRef
from .wake import awake

log = logging.getLogger("mcpd.inference")

# The relayed endpoints (PROTOCOL.md "Client API" and "OpenAI surface"): one route each,
# relayed to the publisher with this ``endpoint`` in the task frame, or proxied to a public
# row's ``url`` with the /v1 prefix replaced by it.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")

JSON = "application/json"


@dataclass
class Head:
    """The response's status line and headers; ``streaming``: the body that follows is an
    event stream, sent as it comes."""

    status: int
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    streaming: bool = False


@dataclass
class Outcome:
    """How one client call ended."""

    endpoint: str
    started: float  # time.perf_counter() when the call came in
    model: str | None = None  # the LLM's name, once one was found
    kind: str | None = None  # "virtual" or "public"
    client_token_id: int | None = None
    client_label: str = ""  # the client token's label (never the token)
    task_id: str | None = None
    streaming: bool = False
    status: int = 0  # the status line sent; 499 if the client left before it
    code: str | None = None  # the error's code, for an error answer or event
    # The status of an error that ended a stream after its 200 was sent (an SSE error event).
    late_status: int | None = None
    wake_s: float = 0.0
    queue_s: float = 0.0
    upstream_s: float | None = None  # the wait for the publisher's (or upstream's) answer
    first_byte_s: float | None = None  # from the start to the first byte of the body
    first_token_s: float | None = None  # from the start to the answer's first data sent
    overhead_s: float | None = None  # the Server-Timing ``mcpd`` part, when one was sent
    total_s: float = 0.0
    failovers: int = 0  # times the task was sent again after its stream went away
    client_left: bool = False
    abandoned: bool = False  # the task ended unanswered: the publisher was told to cancel
    prompt_tokens: int | None = None  # from the answer's usage (None: it reported none)
    completion_tokens: int | None = None
    # Headers every response of the call carries (a limited token's x-ratelimit-*).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def broker_s(self) -> float:
        """What the broker itself spent: total minus the waits for a wake and an answer."""
        return max(0.0, self.total_s - self.wake_s - self.queue_s - (self.upstream_s or 0.0))


# Called with every call's outcome as it ends, on the event loop: no I/O here.
observers: list[Callable[[Outcome], None]] = []


def _observe(outcome: Outcome) -> None:
    for observer in observers:
        try:
            observer(outcome)
        except Exception:
            log.exception("an outcome observer failed")


def _timing(out: Outcome, broker_s: float, upstream_s: float | None = None) -> str:
    out.overhead_s = broker_s
    return server_timing(broker_s, upstream_s)


def server_timing(broker_s: float, upstream_s: float | None = None) -> str:
    parts = [f'mcpd;dur={broker_s * 1000:.2f};desc="broker"']
    if upstream_s is not None:
        parts.append(f'upstream;dur={upstream_s * 1000:.2f};desc="publisher"')
    return ", ".join(parts)


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


def _refusal(event: TaskEvent) -> bool:
    """An error, or an upstream's non-2xx answer: it reaches a streaming client as its own
    status and body instead of a stream."""
    return event["kind"] == "error" or (
        event["kind"] == "result" and not 200 <= event["status"] < 300
    )


async def _shielded(coro: Any) -> None:
    """Run cleanup to the end even if the caller is being cancelled again."""
    try:
        await asyncio.shield(coro)
    except Exception:
        log.exception("cleanup failed")


@dataclass
class _Call:
    """One call in progress: what it asked for and where it stands."""

    endpoint: str
    out: Outcome
    body: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    streaming: bool = False
    pending: Pending | None = None
    finished: bool = False  # the task ended with an answer (else it is abandoned)
    sse: bool = False  # the head sent was an event stream's
    waiting: str = ""  # "waking" or "queued" while the task waits to be sent
    position: int = 0  # in the queue, while queued
    queued_at: float = 0.0
    limit: limits.Admission | None = None  # a limited token's admission
    usage_added: bool = False  # the broker asked the publisher for the stream's usage

    def since_start(self) -> float:
        return time.perf_counter() - self.out.started

    def queued(self, position: int) -> None:
        if self.waiting != "queued":
            self.waiting, self.queued_at = "queued", time.perf_counter()
        self.position = position

    def note(self, first: bool = False) -> bytes:
        """A comment for a client waiting on a stream: where its request stands (each
        interval while it is queued; once, then pings, while the model wakes)."""
        if self.waiting == "queued":
            return sse.comment(f"queued {self.position}")
        if self.waiting == "waking" and first:
            return sse.comment(f"waking {self.name}")
        return sse.PING


async def relay(request: HttpRequest, endpoint: str) -> AsyncGenerator[Head | bytes, None]:
    """The whole of one client call: yields its :class:`Head`, then its body."""
    call = _Call(endpoint, Outcome(endpoint=endpoint, started=time.perf_counter()))
    out = call.out
    try:
        try:
            entry = await _open(call, request)
        except ApiError as exc:
            yield _error_head(out, exc)
            yield exc.body(openai=True)
            return
        if entry.ref is None:
            async with contextlib.aclosing(_public(call, entry.row)) as public:
                async for item in public:
                    yield item
            return
        if not call.streaming:
            head, content = await _unary(call, entry.ref)
            yield head
            yield content
            return
        async with contextlib.aclosing(_stream(call, entry.ref)) as streamed:
            async for item in streamed:
                yield item
    except asyncio.CancelledError:
        out.client_left = True
        raise
    except GeneratorExit:
        out.client_left = True
        raise
    except Exception as exc:
        failure = unavailable(exc)
        if failure is None:
            log.exception("relaying a call for %s failed", call.name or "?")
            failure = internal_error()
        if out.status == 0:
            yield _error_head(out, failure)
            yield failure.body(openai=True)
        elif call.sse:
            out.code, out.late_status = failure.code, failure.status
            yield sse.event(None, failure.openai_body())
    finally:
        if call.pending is not None:
            if call.finished:
                await _shielded(tasks.finish(call.pending))
            else:
                out.abandoned = True
                await _shielded(tasks.abandon(call.pending))
        out.total_s = call.since_start()
        if out.status == 0:
            out.status = 499
        if call.limit is not None:
            tokens = (out.prompt_tokens or 0) + (out.completion_tokens or 0)
            await _shielded(limits.end(call.limit, tokens))
        _observe(out)


def _error_head(out: Outcome, exc: ApiError) -> Head:
    out.status, out.code = exc.status, exc.code
    return Head(exc.status, JSON, {**out.headers, **exc.headers})


def _head(out: Outcome, head: Head) -> Head:
    out.status = head.status
    head.headers.update(out.headers)
    return head


async def _open(call: _Call, request: HttpRequest) -> CachedRow:
    """Authenticate, read the body, find the row (cached: no round trip; routing checks it)."""
    out = call.out
    # A missing token wins over a bad body, and a bad body over an unknown model.
    token = await aauthenticate(request.headers.get("Authorization"), CLIENT_ROLES)
    out.client_token_id, out.client_label = token.pk, token.label
    call.limit = await limits.admit(token)  # None, at no cost, for a token with no limit
    if call.limit is not None:
        out.headers = call.limit.headers
    call.body = read_json_object(request)
    call.name = _model_name(call.body)
    call.streaming = out.streaming = _streaming(call.body)
    entry = await rowcache.lookup(call.name)
    if entry is None:
        raise ApiError(404, "model_not_found", f"The model '{call.name}' does not exist.")
    out.model, out.kind = entry.row.name, entry.row.kind
    if call.streaming and entry.ref is not None:
        call.usage_added = usage.ask_for_usage(call.body, call.endpoint)
    return entry


# How often a request follows a row that changes under it (each time: one row read) before
# it gives up with 503: a row that keeps changing is being re-registered over and over. A
# pool's box that drains and withdraws writes the row three times in a second.
ROUNDS = 6


async def enqueue_infer(
    llm: LlmRef,
    body: dict[str, Any],
    streaming: bool,
    endpoint: str = "/v1/chat/completions",
) -> tuple[Pending, float]:
    """The original service's enqueueInferTask: an inactive row is refused (503), a
    hibernating one is woken first (once across workers), then the infer task goes to one
    of its backends (queued while all are full). Returns the task and the seconds spent
    waking."""
    call = _Call(endpoint, Outcome(endpoint=endpoint, started=time.perf_counter()))
    call.body, call.name, call.streaming = body, llm.name, streaming
    pending = await _prepare(call, llm)
    return pending, call.out.wake_s


async def _prepare(call: _Call, llm: LlmRef) -> Pending:
    """The call's infer task sent: the row woken first if it hibernates, then routed to a
    backend with a free slot, waiting in the LLM's queue while all are full. Follows the
    row when it changed since it was read."""
    hub = await get_hub()
    out = call.out
    for _ in range(ROUNDS):
        if llm.status == LlmStatus.INACTIVE:
            raise offline(f"The publisher of '{llm.name}' is inactive (publisher offline).")
        if llm.status == LlmStatus.HIBERNATING:
            call.waiting = "waking"
            llm, woke = await awake(llm, out.started)
            call.waiting = ""
            out.wake_s += woke
            continue
        frame = tasks.infer_frame(llm, call.body, call.streaming, call.endpoint)
        sent = await queue.send_in_turn(hub, llm, frame, on_queued=call.queued)
        if call.waiting == "queued":
            out.queue_s += time.perf_counter() - call.queued_at
            call.waiting = ""
        if isinstance(sent, Pending):
            call.pending = sent
            out.task_id = sent.task_id
            return sent
        if sent.verdict == "none":
            raise offline(f"The publisher of '{llm.name}' holds no control stream.")
        # The row changed since it was read: read it again, under the stamps just read.
        entry = await rowcache.llm_lookup(llm.name, sent.stamp)
        if entry is None:
            raise ApiError(404, "model_not_found", f"The model '{llm.name}' does not exist.")
        if entry.ref is None:  # the name is a public row's now
            raise offline(f"'{llm.name}' changed while this request was sent; retry.")
        llm = entry.ref
    raise offline(f"'{llm.name}' kept changing while this request was sent; retry.")


def _wake_header(headers: dict[str, str], woke: float) -> None:
    headers["X-Mcpd-Wake"] = f"woke;dur={woke * 1000:.0f}"


async def _failed_over(call: _Call, llm: LlmRef, reason: str) -> Pending:
    """The task's stream went away before it sent anything: drop it and send it again to
    another backend. When none is left, the call fails as it would have without one."""
    assert call.pending is not None
    await tasks.finish(call.pending)  # its record is taken already (hub.lost)
    spare, call.pending = call.pending.spare, None
    call.out.failovers += 1
    log.info("a task of %s fails over to another backend: %s", llm.name, reason)
    try:
        return await _prepare(call, llm)
    except ApiError as exc:
        if exc.code != "publisher_offline":
            raise
        if spare:
            raise ApiError(502, "publisher_disconnected", "publisher disconnected") from exc
        raise ApiError(503, "publisher_offline", reason) from exc


async def _unary(call: _Call, llm: LlmRef) -> tuple[Head, bytes]:
    """A non-streamed answer."""
    out = call.out
    loop = asyncio.get_running_loop()
    try:
        pending = call.pending or await _prepare(call, llm)
        # One deadline for the first answer, whichever backend gives it (failover).
        deadline = loop.time() + settings.MCPD_INFER_TIMEOUT_SECONDS
        while True:
            sent = time.perf_counter()
            event = await tasks.next_event_or_none(pending, max(0.0, deadline - loop.time()))
            out.upstream_s = (out.upstream_s or 0.0) + time.perf_counter() - sent
            if event is None:
                raise tasks.silence_error()
            if event["kind"] != "failover":
                break
            pending = await _failed_over(call, llm, event["reason"])
        if event["kind"] == "error":
            call.finished = True
            raise error_of(event)
        if event["kind"] != "result":
            raise ApiError(
                502,
                "publisher_protocol_error",
                "The publisher streamed an answer to a non-streaming call.",
            )
        call.finished = True
    except ApiError as exc:
        return _error_head(out, exc), exc.body(openai=True)
    out.total_s = call.since_start()
    headers = {"Server-Timing": _timing(out, out.broker_s, out.upstream_s)}
    if out.wake_s:
        _wake_header(headers, out.wake_s)
    out.first_byte_s = out.first_token_s = out.total_s
    usage.note_body(out, event["json"])
    return _head(out, Head(event["status"], JSON, headers)), event["json"]


async def _noting(call: _Call, job: asyncio.Future[Any]) -> AsyncGenerator[bytes, None]:
    """Wait for ``job`` on a committed stream: a comment each ping interval saying where the
    request stands (waking, queued at a position, or a plain ping)."""
    while not job.done():
        await asyncio.wait({job}, timeout=settings.MCPD_PING_SECONDS)
        if not job.done():
            yield call.note()


async def _stream(call: _Call, llm: LlmRef) -> AsyncGenerator[Head | bytes, None]:
    """A streamed answer (see the module's docstring for when its status line is sent)."""
    out = call.out
    loop = asyncio.get_running_loop()
    window_end = loop.time() + settings.MCPD_PING_SECONDS
    headers: dict[str, str] = {}
    first: TaskEvent | None = None
    committed = False
    try:
        if call.pending is None:
            preparing = asyncio.ensure_future(_prepare(call, llm))
            try:
                await asyncio.wait({preparing}, timeout=settings.MCPD_PING_SECONDS)
                if not preparing.done():
                    # The wait outlasts the window: commit to the stream, and say why.
                    committed = True
                    yield _head(out, _sse_head(call, headers))
                    out.first_byte_s = call.since_start()
                    yield call.note(first=True)
                    async with contextlib.aclosing(_noting(call, preparing)) as notes:
                        async for note in notes:
                            yield note
            finally:
                if not preparing.done():
                    preparing.cancel()
            preparing.result()  # raises the preparation's error
            if out.wake_s and committed:
                yield sse.comment(f"mcpd woke {llm.name} in {out.wake_s:.3f} s")
            elif out.wake_s:
                _wake_header(headers, out.wake_s)
        if not committed:
            deadline = loop.time() + settings.MCPD_INFER_TIMEOUT_SECONDS
            while True:
                assert call.pending is not None
                wait = max(0.0, min(window_end, deadline) - loop.time())
                first = await tasks.next_event_or_none(call.pending, wait)
                if first is None or first["kind"] != "failover":
                    break
                await _failed_over(call, llm, first["reason"])
            if first is None and loop.time() >= deadline:
                raise tasks.silence_error()
            if first is not None and _refusal(first):
                call.finished = True
                if first["kind"] == "error":
                    raise error_of(first)
                if first["kind"] == "result":
                    yield _head(out, Head(first["status"], JSON, headers))
                    out.first_byte_s = call.since_start()
                    yield first["json"]
                    return
            out.total_s = call.since_start()
            headers["Server-Timing"] = _timing(out, out.broker_s)
            committed = True
            yield _head(out, _sse_head(call, headers))
            out.first_byte_s = call.since_start()
            if first is None:
                yield sse.PING  # a ping interval passed in silence already
    except ApiError as exc:
        if not committed:
            yield _error_head(out, exc)
            yield exc.body(openai=True)
            return
        out.code, out.late_status = exc.code, exc.status
        yield sse.event(None, exc.openai_body())
        return
    async with contextlib.aclosing(_stream_body(call, llm, first)) as body:
        async for chunk in body:
            yield chunk


def _sse_head(call: _Call, headers: dict[str, str]) -> Head:
    call.sse = True
    return Head(200, sse.CONTENT_TYPE, {**sse.HEADERS, **headers}, streaming=True)


async def _stream_body(
    call: _Call, llm: LlmRef, first: TaskEvent | None
) -> AsyncGenerator[bytes, None]:
    """The client's event stream once its head is sent: the task's chunks as they come, and
    always ``data: [DONE]`` or an error event at the end."""
    loop = asyncio.get_running_loop()
    timeout = settings.MCPD_INFER_TIMEOUT_SECONDS
    deadline = loop.time() + timeout
    event = first
    try:
        while True:
            assert call.pending is not None
            if event is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise tasks.silence_error()
                event = await tasks.next_event_or_none(
                    call.pending, min(settings.MCPD_PING_SECONDS, remaining)
                )
                if event is None:
                    yield sse.PING
                    continue
            if event["kind"] == "failover":
                # Nothing was relayed yet: the same call goes to another backend.
                again = asyncio.ensure_future(_failed_over(call, llm, event["reason"]))
                try:
                    async with contextlib.aclosing(_noting(call, again)) as notes:
                        async for note in notes:
                            yield note
                finally:
                    if not again.done():
                        again.cancel()
                again.result()
                event = None
                continue
            deadline = loop.time() + timeout
            if event["kind"] == "error":
                call.finished = True
                raise error_of(event)
            if event["kind"] == "result":
                call.finished = True
                body = result_body(event)
                if 200 <= event["status"] < 300:
                    # An upstream that ignored "stream": one chunk, then [DONE].
                    call.out.first_token_s = call.since_start()
                    usage.note_body(call.out, body)
                    yield sse.data(jsonio.dumps_line(as_stream_chunk(body)))
                    yield sse.DONE
                    return
                error = body.get("error") if isinstance(body, dict) else None
                message = error.get("message") if isinstance(error, dict) else None
                raise ApiError(502, "upstream_error", str(message or body))
            out = []
            for chunk in event["chunks"]:
                data: str | None = chunk["data"]
                if data:
                    data = usage.relayed_chunk(call.out, data, call.usage_added)
                if data:
                    out.append(sse.data(data))
                if chunk["done"]:
                    call.finished = True
                    if chunk["data"] != "[DONE]":
                        out.append(sse.DONE)
                    break
            if call.out.first_token_s is None:
                call.out.first_token_s = call.since_start()
            yield b"".join(out)
            if call.finished:
                return
            event = None
    except ApiError as exc:
        call.out.code, call.out.late_status = exc.code, exc.status
        yield sse.event(None, exc.openai_body())


async def _public(call: _Call, row: Llm) -> AsyncGenerator[Head | bytes, None]:
    """A public row: the call proxied to its upstream."""
    out = call.out
    sent = time.perf_counter()
    try:
        upstream = await proxy.forward(row, call.endpoint, call.body, call.streaming)
    except ApiError as exc:
        yield _error_head(out, exc)
        yield exc.body(openai=True)
        return
    out.upstream_s = time.perf_counter() - sent
    headers = {"Server-Timing": _timing(out, sent - out.started)}
    if upstream.streaming:
        call.sse = True
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    yield _head(
        out, Head(upstream.status, upstream.content_type, headers, streaming=upstream.streaming)
    )
    out.first_byte_s = call.since_start()
    seen = usage.StreamUsage(out) if upstream.streaming else None
    if seen is None:
        usage.note_body(out, upstream.content)
    async with contextlib.aclosing(upstream.body()) as body:
        async for chunk in body:
            if out.first_token_s is None:
                out.first_token_s = call.since_start()
            if seen is not None:
                seen.feed(chunk)
            yield chunk

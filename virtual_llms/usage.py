"""Usage records: every finished inference call, kept in a per-process buffer (no I/O on the
request path) and written to the database in batches every FLUSH_SECONDS; the token counts an
answer reports (asking a streaming publisher for them when the client did not); reading them
back summed per token, model or day; and pruning them past MCPD_USAGE_RETENTION_DAYS.

A worker killed with SIGKILL loses the records of its last FLUSH_SECONDS at most; one that is
stopped (SIGTERM) writes its buffer while it drains. Each worker writes its own calls, so
nothing is counted twice however many workers there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from .errors import unavailable
from .loopcache import PerLoop
from .models import ApiToken, UsageRecord

log = logging.getLogger("mcpd.usage")

# How often each worker writes its buffered records: what a killed worker can lose.
FLUSH_SECONDS = 1.0
# Records kept while the database is away; past this the oldest are dropped (and logged).
MAX_BUFFERED = 50_000
# The endpoints whose streams can carry a usage chunk (OpenAI's stream_options).
USAGE_STREAMS = ("/v1/chat/completions", "/v1/completions")

# A finished call's record, as the observer takes it (see record()).
Pending = tuple[Any, ...]
_buffer: list[Pending] = []
_flushers: PerLoop[asyncio.Task[None]] = PerLoop()


# --- token counts from answers -------------------------------------------------------------


def ask_for_usage(body: dict[str, Any], endpoint: str) -> bool:
    """For a streamed call that did not ask for ``stream_options.include_usage``: ask for it
    in the body sent on; True when it was added (the usage-only chunk is then removed from
    the client's stream, see :func:`relayed_chunk`)."""
    if endpoint not in USAGE_STREAMS:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if options is not None and not isinstance(options, dict):
        return False  # the upstream will refuse it as it is; not ours to fix
    body["stream_options"] = {**(options or {}), "include_usage": True}
    return True


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def note_usage(out: Any, usage: Any) -> None:
    """Take ``prompt_tokens`` and ``completion_tokens`` of an answer's ``usage`` (Responses
    API: ``input_tokens``, ``output_tokens``) onto the call's outcome."""
    if not isinstance(usage, dict):
        return
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    if prompt is not None or completion is not None:
        out.prompt_tokens, out.completion_tokens = prompt, completion


_decoder = json.JSONDecoder()


def _usage_at_end(body: bytes) -> Any:
    """The object after the last ``"usage":`` key of a JSON body, parsed alone (an answer's
    usage comes last: a long answer is not parsed whole), or None when that is not it."""
    at = body.rfind(b'"usage"')
    if at <= 0 or body[at - 1 : at] == b"\\":  # inside a string: "\"usage\""
        return None
    tail = body[at + 7 : at + 7 + 1024].lstrip()
    if not tail.startswith(b":"):
        return None
    try:
        value, _ = _decoder.raw_decode(tail[1:].lstrip().decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def note_body(out: Any, body: Any) -> None:
    """The usage of a whole answer (its JSON bytes, or parsed)."""
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body)
        if b'"usage"' not in body:
            return
        found = _usage_at_end(body)
        if found is not None and ("prompt_tokens" in found or "input_tokens" in found):
            note_usage(out, found)
            return
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
    if isinstance(body, dict):
        usage = body.get("usage")
        if usage is None and isinstance(body.get("response"), dict):  # responses' last event
            usage = body["response"].get("usage")
        note_usage(out, usage)


def relayed_chunk(out: Any, data: str, added: bool) -> str | None:
    """One chunk of a streamed answer, as the client gets it: its usage noted, and when the
    broker ``added`` the ask for usage, the usage-only chunk dropped (None) and the
    ``"usage": null`` the upstream put in the other chunks taken out. Chunks without the
    word "usage" pass untouched, unparsed."""
    if '"usage"' not in data:
        return data
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if not isinstance(chunk, dict):
        return data
    usage = chunk.get("usage")
    if usage is None and isinstance(chunk.get("response"), dict):  # /v1/responses
        usage = chunk["response"].get("usage")
    note_usage(out, usage)
    if not added or "usage" not in chunk:
        return data
    if isinstance(usage, dict) and not chunk.get("choices"):
        return None
    if usage is None:
        del chunk["usage"]
        return orjson.dumps(chunk).decode()
    return data


class StreamUsage:
    """The usage of a stream passed through as bytes (a public row's): its ``data:`` lines
    that name a ``usage`` are parsed as they pass (a line cut between two reads is put back
    together; the others cost a substring search)."""

    # A line longer than this without a newline is not an event we can read.
    MAX_LINE = 65_536

    def __init__(self, out: Any) -> None:
        self.out = out
        self.rest = b""

    def feed(self, chunk: bytes) -> None:
        data = self.rest + chunk if self.rest else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self.rest = data[-self.MAX_LINE :]
            return
        self.rest = data[end + 1 : end + 1 + self.MAX_LINE]
        if data.find(b'"usage"', 0, end) < 0:
            return
        for line in data[:end].split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                note_body(self.out, line[5:].strip())


# --- records, buffered and written in batches ------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def record(out: Any) -> None:
    """An inference observer (inference.observers): the call's record joins the buffer.
    Calls no token was verified for are not anyone's usage."""
    if out.client_token_id is None:
        return
    # A tuple: the model instances are made by the flush, off the request path.
    _buffer.append(
        (
            out.client_token_id,
            out.model,
            out.endpoint,
            out.status,
            out.code,
            out.streaming,
            out.prompt_tokens,
            out.completion_tokens,
            out.first_byte_s,
            out.queue_s,
            out.wake_s,
            out.total_s,
            time.time(),
        )
    )
    with contextlib.suppress(RuntimeError):  # no running loop (sync code): flush() writes it
        _flushers.get(lambda: asyncio.create_task(_flush_loop(), name="mcpd-usage-flush"))


def _model(item: Pending) -> UsageRecord:
    token_id, model, endpoint, status, code, streamed, prompt, completion = item[:8]
    ttfb, queue, wake, total, when = item[8:]
    return UsageRecord(
        token_id=token_id,
        llm_name=(model or "")[:128],
        endpoint=endpoint,
        status=status,
        code=(code or "")[:64],
        streamed=streamed,
        prompt_tokens=prompt,
        completion_tokens=completion,
        ttfb_ms=_ms(ttfb),
        queue_ms=_ms(queue) or 0.0,
        wake_ms=_ms(wake) or 0.0,
        duration_ms=_ms(total) or 0.0,
        created_at=datetime.fromtimestamp(when, UTC),
    )


def _write(items: list[Pending]) -> None:
    rows = [_model(item) for item in items]
    try:
        with transaction.atomic():
            UsageRecord.objects.bulk_create(rows, batch_size=1000)
    except IntegrityError:
        # A token deleted since its call (tokens are revoked, not deleted, but a shell can):
        # its records keep no token rather than keep the whole batch out for ever.
        ids = {row.token_id for row in rows}
        known = set(ApiToken.objects.filter(pk__in=ids).values_list("pk", flat=True))
        for row in rows:
            if row.token_id not in known:
                row.token_id = None
        UsageRecord.objects.bulk_create(rows, batch_size=1000)


def reset() -> None:
    """Forget the buffered records (tests)."""
    _buffer.clear()


def flush_sync() -> int:
    """Write the buffer now, from sync code; how many records were written."""
    rows = _take()
    if rows:
        try:
            _write(rows)
        except Exception:
            _put_back(rows)
            raise
    return len(rows)


async def flush() -> int:
    """Write the buffer now (the flush loop, a draining worker, tests)."""
    rows = _take()
    if rows:
        try:
            await sync_to_async(_write)(rows)
        except Exception:
            _put_back(rows)
            raise
    return len(rows)


async def flush_at_exit() -> None:
    """A draining worker's last write; what it cannot write is logged and lost."""
    try:
        await flush()
    except Exception:
        log.warning("usage: %d record(s) lost at exit", len(_buffer), exc_info=True)


def _take() -> list[Pending]:
    global _buffer
    rows, _buffer = _buffer, []
    return rows


def _put_back(rows: list[Pending]) -> None:
    global _buffer
    _buffer = rows + _buffer
    if len(_buffer) > MAX_BUFFERED:
        dropped = len(_buffer) - MAX_BUFFERED
        del _buffer[:dropped]
        log.warning("usage: %d record(s) dropped while the database was away", dropped)


async def _flush_loop() -> None:
    failing = False
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        try:
            await flush()
            if failing:
                log.info("usage: records written again")
            failing = False
        except Exception as exc:
            if not failing:
                # The database away (a restart): one line, no traceback (errors.unavailable).
                away = unavailable(exc) is not None
                log.warning(
                    "usage: writing records failed%s; kept and retried",
                    f" ({type(exc).__name__}: {exc})" if away else "",
                    exc_info=not away,
                )
            failing = True


# --- reading and pruning -----------------------------------------------------------------------

GROUPS = ("token", "model", "day")


@dataclass(frozen=True)
class UsageRow:
    key: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "errors": self.errors,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
        }


def _sums() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "errors": Count("id", filter=Q(status__gte=400)),
        "prompt": Sum("prompt_tokens"),
        "completion": Sum("completion_tokens"),
    }


def _grouped(qs: QuerySet[UsageRecord], field: str) -> Iterable[dict[str, Any]]:
    return list(qs.order_by().values(field).annotate(**_sums()))


def summary(
    since: datetime, until: datetime, group_by: str, token: ApiToken | None = None
) -> list[UsageRow]:
    """Usage between ``since`` and ``until`` summed per token label, LLM name or UTC day
    (busiest first; days in order). ``token``: that token's usage only, as one row."""
    qs = UsageRecord.objects.between(since, until)
    if token is not None:
        return [_row(token.label, qs.filter(token=token).aggregate(**_sums()))]
    if group_by == "day":
        qs = qs.annotate(day=TruncDate("created_at", tzinfo=UTC))
        rows = [_row(str(r["day"]), r) for r in _grouped(qs, "day")]
        return sorted(rows, key=lambda r: r.key)
    field = {"token": "token__label", "model": "llm_name"}[group_by]
    rows = [_row(str(r[field] or ""), r) for r in _grouped(qs, field)]
    return sorted(rows, key=lambda r: (-r.requests, r.key))


def _row(key: str, sums: dict[str, Any]) -> UsageRow:
    return UsageRow(
        key=key,
        requests=int(sums["requests"] or 0),
        errors=int(sums["errors"] or 0),
        prompt_tokens=int(sums["prompt"] or 0),
        completion_tokens=int(sums["completion"] or 0),
    )


def prune(now: datetime | None = None) -> int:
    """Delete records older than MCPD_USAGE_RETENTION_DAYS (gcsweep); how many went."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.MCPD_USAGE_RETENTION_DAYS)
    deleted, _ = UsageRecord.objects.older_than(cutoff).delete()
    return deleted

"""One log line per relayed client call (logger ``mcpd.request``, INFO), one per control stream
opened or closed on this worker (``mcpd.stream``) and one per wake it led (``mcpd.wake``):
``key=value`` pairs, grep-able; with ``MCPD_LOG_FORMAT=json`` the fields are also the
record's attributes, so each is a key of the line's JSON object (settings.LOGGING).

Never a body, a prompt or a secret: the client token appears by its label, the task by its
id. The worker is named by the port ``manage.py serve`` listens on (else ``pid<pid>``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from django.conf import settings

from . import inference, observers
from .inference import Outcome
from .observers import StreamEvent, WakeEvent

requests_log = logging.getLogger("mcpd.request")
streams_log = logging.getLogger("mcpd.stream")
wakes_log = logging.getLogger("mcpd.wake")

_worker = f"pid{os.getpid()}"


def worker_name() -> str:
    """This worker's name in the log lines (its port under `manage.py serve`)."""
    return _worker


def set_worker(name: str) -> None:
    """Name this worker in the lines (``manage.py serve``: its port)."""
    global _worker
    _worker = name


def _value(value: Any) -> str:
    """A field as it reads in the line: ``-`` for nothing, quoted if it has spaces."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if any(c in text for c in ' "=\n\t\\'):
        return json.dumps(text)
    return text


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _emit(logger: logging.Logger, fields: dict[str, Any]) -> None:
    message = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
    logger.info(message, extra=fields)


def log_call(out: Outcome) -> None:
    """An inference observer: the call's line. Written out field by field (the hot path:
    about 10 us with the logging call): names, codes and task ids never need quoting."""
    if not requests_log.isEnabledFor(logging.INFO):
        return
    ttfb = "-" if out.first_byte_s is None else f"{out.first_byte_s * 1000:.1f}"
    line = (
        f"model={out.model or '-'} endpoint={out.endpoint} status={out.status} "
        f"code={out.code or '-'} stream={int(out.streaming)} ms={out.total_s * 1000:.1f} "
        f"ttfb_ms={ttfb} queue_ms={out.queue_s * 1000:.1f} wake_ms={out.wake_s * 1000:.1f} "
        f"token={_value(out.client_label)} task={out.task_id or '-'} worker={_worker}"
    )
    if out.failovers:
        line += f" failovers={out.failovers}"
    if out.prompt_tokens is not None or out.completion_tokens is not None:
        line += f" prompt_tokens={_value(out.prompt_tokens)}"
        line += f" completion_tokens={_value(out.completion_tokens)}"
    if settings.MCPD_LOG_FORMAT != "json":
        requests_log.info(line)
        return
    fields: dict[str, Any] = {
        "model": out.model,
        "endpoint": out.endpoint,
        "status": out.status,
        "code": out.code,
        "stream": out.streaming,
        "ms": _ms(out.total_s),
        "ttfb_ms": _ms(out.first_byte_s),
        "queue_ms": _ms(out.queue_s),
        "wake_ms": _ms(out.wake_s),
        "token": out.client_label or None,
        "task": out.task_id,
        "worker": _worker,
        "failovers": out.failovers,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
    }
    requests_log.info(line, extra=fields)


def log_stream(event: StreamEvent) -> None:
    if not streams_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "event": "stream_open" if event.opened else "stream_close",
        "session": event.session_id,
        "transport": event.transport,
        "epoch": event.epoch,
    }
    if not event.opened:
        fields["seconds"] = round(event.seconds, 1)
        fields["why"] = event.why
    fields["worker"] = _worker
    _emit(streams_log, fields)


def log_wake(event: WakeEvent) -> None:
    if not wakes_log.isEnabledFor(logging.INFO):
        return
    _emit(
        wakes_log,
        {
            "event": "wake",
            "model": event.model,
            "session": event.session_id,
            "outcome": event.outcome,
            "code": event.code,
            "ms": _ms(event.seconds),
            "worker": _worker,
        },
    )


def install() -> None:
    """Register the observers (apps.py, once per process)."""
    if log_call not in inference.observers:
        inference.observers.append(log_call)
        observers.stream_observers.append(log_stream)
        observers.wake_observers.append(log_wake)

"""Prometheus metrics (PROTOCOL.md "Health and metrics"): this worker's counters and histograms,
recorded from each client call's Outcome and from the stream and wake events
(observers.py) with no I/O, and the broker-wide gauges, read from the shared state at each
scrape of ``GET /metrics`` (two database queries and one state read, whatever the fleet's
size), so every worker reports the same values for them.

Labels are bounded: ``model`` is a registered name (``""`` for a call that named none that
exists), and a name that is no longer registered loses its series at the next scrape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import fleet_snapshot, inference, observers
from .auth import ADMIN_ROLES, aauthenticate
from .errors import unavailable
from .http import json_view
from .hub import current_hub
from .inference import Outcome
from .observers import StreamEvent, WakeEvent

log = logging.getLogger("mcpd.metrics")

# No ``*_created`` series beside each counter and histogram: a third more lines to render at
# each scrape (the text format's cost is per line), which Prometheus does not need.
disable_created_metrics()  # type: ignore[no-untyped-call,unused-ignore]  # untyped in the library

# This worker's own series (the process collectors: CPU, memory, file descriptors, GC).
WORKER = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    WORKER.register(_collector)

# Seconds. Relayed calls run from milliseconds (a cached answer) to minutes (a long
# generation, a cold wake); the broker's own share is a millisecond or two.
# Few buckets: each is a line per model at every scrape.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
WAKE_BUCKETS = (0.5, 1, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "mcpd_requests",
    "Client calls relayed by this worker, by model, endpoint and HTTP status (499: the client "
    "left first; a stream that failed after its 200 counts with its error's status).",
    ["model", "endpoint", "code"],
    registry=WORKER,
)
DURATION = Histogram(
    "mcpd_request_duration_seconds",
    "Client calls from arrival to their last byte.",
    ["model", "endpoint"],
    buckets=CALL_BUCKETS,
    registry=WORKER,
)
TTFT = Histogram(
    "mcpd_time_to_first_token_seconds",
    "Successful calls from arrival to the answer's first data (a whole answer: its end).",
    ["model"],
    buckets=CALL_BUCKETS,
    registry=WORKER,
)
OVERHEAD = Histogram(
    "mcpd_broker_overhead_seconds",
    "The broker's own time in a call (Server-Timing mcpd: total less the waits for a wake, "
    "the queue and the publisher).",
    ["endpoint"],
    buckets=OVERHEAD_BUCKETS,
    registry=WORKER,
)
QUEUE_WAIT = Histogram(
    "mcpd_queue_wait_seconds",
    "Calls that waited in their model's queue for a free slot: how long.",
    ["model"],
    buckets=QUEUE_BUCKETS,
    registry=WORKER,
)
WAKES = Counter(
    "mcpd_wakes",
    "Wakes this worker led (one per wake across workers), by outcome: ok, failed, timeout.",
    ["model", "outcome"],
    registry=WORKER,
)
WAKE_DURATION = Histogram(
    "mcpd_wake_duration_seconds",
    "Wakes this worker led, from the wake task sent to its outcome.",
    ["model"],
    buckets=WAKE_BUCKETS,
    registry=WORKER,
)
CANCELLATIONS = Counter(
    "mcpd_cancellations",
    "Tasks the publisher was told to cancel, by reason: client_left, timeout, error.",
    ["model", "reason"],
    registry=WORKER,
)
FAILOVERS = Counter(
    "mcpd_failovers",
    "Tasks sent again to another backend after their stream went away.",
    ["model"],
    registry=WORKER,
)
TOKENS = Counter(
    "mcpd_tokens",
    "Tokens the answers' usage reports, by kind: prompt, completion.",
    ["model", "kind"],
    registry=WORKER,
)
CONTROL_STREAMS = Gauge(
    "mcpd_control_streams",
    "Publishers' control streams this worker holds, by transport: sse, ws.",
    ["transport"],
    registry=WORKER,
)
for _transport in ("sse", "ws"):
    CONTROL_STREAMS.labels(_transport)
WAKE_WAITING = Gauge(
    "mcpd_wake_waiting",
    "Calls on this worker waiting for a model to wake (whichever worker leads the wake).",
    registry=WORKER,
)


class _Children:
    """A metric's children by label values, remembered: ``labels()`` checks and locks on
    every call, a dict lookup is a tenth of that (the hot path records seven series). Also
    the list of label sets the scrape prunes (the model is the first label)."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.by: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self.by.get(labels)
        if child is None:
            child = self.by[labels] = self.metric.labels(*labels)
        return child


_requests, _duration, _overhead = _Children(REQUESTS), _Children(DURATION), _Children(OVERHEAD)
_ttft, _queue_wait, _tokens = _Children(TTFT), _Children(QUEUE_WAIT), _Children(TOKENS)
_cancellations, _failovers = _Children(CANCELLATIONS), _Children(FAILOVERS)
_wakes, _wake_duration = _Children(WAKES), _Children(WAKE_DURATION)
# Those whose first label is the model.
BY_MODEL = (
    _requests,
    _duration,
    _ttft,
    _queue_wait,
    _tokens,
    _cancellations,
    _failovers,
    _wakes,
    _wake_duration,
)


def _cancel_reason(out: Outcome) -> str:
    if out.client_left:
        return "client_left"
    return "timeout" if out.code == "timeout" else "error"


def record(out: Outcome) -> None:
    """An inference observer: one call's series (no I/O)."""
    model, endpoint = out.model or "", out.endpoint
    _requests(model, endpoint, str(out.late_status or out.status)).inc()
    _duration(model, endpoint).observe(out.total_s)
    if out.overhead_s is not None:
        _overhead(endpoint).observe(out.overhead_s)
    if not model:
        return
    if out.first_token_s is not None and out.code is None and 200 <= out.status < 300:
        _ttft(model).observe(out.first_token_s)
    if out.queue_s > 0:
        _queue_wait(model).observe(out.queue_s)
    if out.abandoned:
        _cancellations(model, _cancel_reason(out)).inc()
    if out.failovers:
        _failovers(model).inc(out.failovers)
    if out.prompt_tokens:
        _tokens(model, "prompt").inc(out.prompt_tokens)
    if out.completion_tokens:
        _tokens(model, "completion").inc(out.completion_tokens)


def record_stream(event: StreamEvent) -> None:
    CONTROL_STREAMS.labels(event.transport).inc(1 if event.opened else -1)


def record_wake(event: WakeEvent) -> None:
    _wakes(event.model, event.outcome).inc()
    _wake_duration(event.model).observe(event.seconds)


def install() -> None:
    """Register the observers (apps.py, once per process)."""
    if record not in inference.observers:
        inference.observers.append(record)
        observers.stream_observers.append(record_stream)
        observers.wake_observers.append(record_wake)


# --- the scrape ---------------------------------------------------------------------------


def prune(names: frozenset[str]) -> None:
    """Drop the series of model names no longer registered (the labels stay bounded)."""
    for children in BY_MODEL:
        # list(): one copy, safe while the event loop's thread adds children.
        for labels in list(children.by):
            if labels[0] and labels[0] not in names:
                children.metric.remove(*labels)
                children.by.pop(labels, None)


def broker_families(snapshot: fleet_snapshot.Snapshot | None) -> Iterator[Metric]:
    """The broker-wide gauges of one snapshot; ``mcpd_fleet_read_ok`` 0 when none could be
    read (the shared state or the database is away)."""
    ok = GaugeMetricFamily(
        "mcpd_fleet_read_ok", "1 when this scrape read the fleet's gauges from the shared state."
    )
    ok.add_metric([], 0 if snapshot is None else 1)
    yield ok
    if snapshot is None:
        return
    backends = GaugeMetricFamily(
        "mcpd_backends",
        f"Backends of each virtual model by status: {', '.join(fleet_snapshot.BACKEND_STATES)} "
        "(disconnected: live in the registry, no stream held). Broker-wide.",
        labels=["model", "status"],
    )
    inflight = GaugeMetricFamily(
        "mcpd_inflight_requests",
        "Tasks dispatched to each model's backends and not ended, on all workers.",
        labels=["model"],
    )
    depth = GaugeMetricFamily(
        "mcpd_queue_depth",
        "Calls waiting for a free slot of each model, on all workers.",
        labels=["model"],
    )
    slots = GaugeMetricFamily(
        "mcpd_slots",
        "Slots of each model's backends that take tasks now (+Inf: one has no limit).",
        labels=["model"],
    )
    for llm in snapshot.llms:
        # "active" always (so that none active is a 0, not a missing series), the other
        # states when a backend is in them: a line per state and model is a fifth of the
        # scrape's cost with hundreds of models.
        counts = {"active": 0}
        for backend in llm.backends:
            counts[backend.state] = counts.get(backend.state, 0) + 1
        for status, n in counts.items():
            backends.add_metric([llm.name, status], n)
        inflight.add_metric([llm.name], llm.in_flight)
        depth.add_metric([llm.name], llm.queue_depth)
        total = llm.slots
        slots.add_metric([llm.name], math.inf if math.isinf(total) else total)
    yield from (backends, inflight, depth, slots)


class _Scrape(Collector):
    """What one scrape exposes: this worker's series, then the broker's gauges."""

    def __init__(self, snapshot: fleet_snapshot.Snapshot | None) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        yield from WORKER.collect()
        yield from broker_families(self.snapshot)


def scrape(accept: str | None) -> tuple[bytes, str, str]:
    """The exposition (text format, or OpenMetrics when ``accept`` asks), its type, and a
    Server-Timing header: the fleet's read, the rendering, and the CPU both took, in ms
    (the CPU time does not grow on a busy machine; the others do)."""
    started, cpu = time.perf_counter(), time.thread_time()
    snapshot: fleet_snapshot.Snapshot | None = None
    try:
        snapshot = fleet_snapshot.read()
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        log.warning("metrics: the fleet could not be read: %s", exc)
    if snapshot is not None:
        prune(snapshot.names)
    read = time.perf_counter()
    encoder, content_type = choose_encoder(accept or "")
    body = encoder(_Scrape(snapshot))
    timing = (
        f'fleet;dur={(read - started) * 1000:.2f};desc="shared state", '
        f"render;dur={(time.perf_counter() - read) * 1000:.2f}, "
        f'cpu;dur={(time.thread_time() - cpu) * 1000:.2f};desc="CPU"'
    )
    return body, content_type, timing


@json_view("GET")
async def metrics_view(request: HttpRequest) -> HttpResponseBase:
    """``GET /metrics``: for an admin token, or anyone with MCPD_METRICS_PUBLIC."""
    if not settings.MCPD_METRICS_PUBLIC:
        await aauthenticate(request.headers.get("Authorization"), ADMIN_ROLES)
    hub = current_hub()  # read on the hub's loop; the scrape itself runs on a thread
    WAKE_WAITING.set(0 if hub is None else hub.wake_waiting())
    body, content_type, timing = await sync_to_async(scrape)(request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type, headers={"Server-Timing": timing})

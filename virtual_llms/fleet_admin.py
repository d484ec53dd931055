"""The admin's Fleet page: every virtual LLM with its backends, queue, wake and last five
minutes, re-read every few seconds by htmx (django-htmx's vendored copy) from a fragment URL,
with Drain / Evict per backend. One read of the shared state per refresh, whatever the size
of the fleet (fleet_snapshot.read(detail=True)), and five database queries."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.db import connection
from django.db.models import Aggregate, Count, FloatField, Q
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.urls.resolvers import URLPattern
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from . import backends, fleet_snapshot, stream_epochs
from .errors import ApiError
from .models import Backend, Llm, LlmKind, UsageRecord

# The window of the requests, errors and p50 time to first token beside each LLM.
RECENT = timedelta(minutes=5)
ACTIONS = ("drain", "undrain", "evict")


class Median(Aggregate):
    """PostgreSQL's ``percentile_cont(0.5)`` (SQLite has none: the page shows no p50 there)."""

    function = "percentile_cont"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


@dataclass(frozen=True)
class BackendRow:
    session_id: str
    token: str
    owner: str
    state: str  # fleet_snapshot.BACKEND_STATES
    in_flight: int
    slots: int | None
    draining: bool
    worker: str  # "" when no stream is held, "?" when its epoch does not say
    transport: str
    since: datetime | None
    actionable: bool  # a Backend row exists (Drain / Evict act on it)


@dataclass(frozen=True)
class LlmRow:
    name: str
    backends: tuple[BackendRow, ...]
    queue_depth: int
    in_flight: int
    slots: float
    waking: bool
    wake_age_s: int | None  # since the request that started the wake arrived
    requests: int
    errors: int
    p50_ttft_ms: float | None

    @property
    def slots_text(self) -> str:
        return "∞" if self.slots == float("inf") else str(int(self.slots))


def _recent(now: datetime) -> dict[str, tuple[int, int, float | None]]:
    """Per LLM name: requests, errors and p50 time to first byte (ms) in the last RECENT, in
    one aggregate query (created_at is indexed)."""
    sums: dict[str, Any] = {
        "requests": Count("id"),
        "errors": Count("id", filter=Q(status__gte=400)),
    }
    if connection.vendor == "postgresql":
        sums["p50"] = Median("ttfb_ms")
    rows = (
        UsageRecord.objects.filter(created_at__gte=now - RECENT)
        .values("llm_name")
        .annotate(**sums)
        .order_by()
    )
    return {r["llm_name"]: (r["requests"], r["errors"], r.get("p50")) for r in rows}


def _wake_age(lease: str, now: datetime) -> int | None:
    """The age of the wake whose lease reads "<epoch> <holder> <since ms>" (wake_join.lua)."""
    parts = lease.split(" ")
    if len(parts) < 3 or not parts[2].isdigit():
        return None
    return max(0, int(now.timestamp() - int(parts[2]) / 1000))


def fleet(now: datetime | None = None) -> tuple[LlmRow, ...]:
    """The page's rows: one snapshot (one state read) and the labels of the backends' tokens."""
    now = now or timezone.now()
    snapshot = fleet_snapshot.read(detail=True)
    labels: dict[tuple[uuid.UUID, str], tuple[str, str]] = {
        (llm_id, sid): (label, owner or "")
        for llm_id, sid, label, owner in Backend.objects.values_list(
            "llm_id", "session_id", "token__label", "token__owner"
        )
    }
    row_labels: dict[uuid.UUID, tuple[str, str]] = {
        llm_id: (label or "", owner or "")
        for llm_id, label, owner in Llm.objects.filter(kind=LlmKind.VIRTUAL).values_list(
            "id", "publisher_token__label", "publisher_token__owner"
        )
    }
    recent = _recent(now)
    rows = []
    for llm in sorted(snapshot.llms, key=lambda v: v.name):
        views = []
        for b in llm.backends:
            known = (llm.id, b.session_id) in labels
            token, owner = labels.get((llm.id, b.session_id)) or row_labels.get(llm.id, ("", ""))
            info = None
            if b.presence:
                info = stream_epochs.parse(b.presence.partition(" ")[2])
            views.append(
                BackendRow(
                    session_id=b.session_id,
                    token=token,
                    owner=owner,
                    state=b.state,
                    in_flight=b.in_flight,
                    slots=b.slots,
                    draining=b.draining,
                    worker=(info.worker if info else "?") if b.presence else "",
                    transport=info.transport if info else "",
                    since=info.since if info else None,
                    actionable=known,
                )
            )
        requests, errors, p50 = recent.get(llm.name, (0, 0, None))
        rows.append(
            LlmRow(
                name=llm.name,
                backends=tuple(views),
                queue_depth=llm.queue_depth,
                in_flight=llm.in_flight,
                slots=llm.slots,
                waking=bool(llm.wake),
                wake_age_s=_wake_age(llm.wake, now) if llm.wake else None,
                requests=requests,
                errors=errors,
                p50_ttft_ms=p50,
            )
        )
    return tuple(rows)


def _context(request: HttpRequest) -> dict[str, Any]:
    now = timezone.now()
    rows = fleet(now)
    return {
        "rows": rows,
        "now": now,
        "backend_count": sum(len(r.backends) for r in rows),
        "can_change": request.user.has_perm("virtual_llms.change_backend"),
        "refresh_seconds": settings.MCPD_FLEET_REFRESH_SECONDS,
        "action_url": reverse("mcpd-fleet-backend"),
    }


def _allowed(request: HttpRequest) -> bool:
    return bool(request.user.has_perm("virtual_llms.view_llm"))


def page(request: HttpRequest) -> HttpResponseBase:
    if not _allowed(request):
        return HttpResponse("You may not see the fleet.", status=403, content_type="text/plain")
    context = {
        **admin.site.each_context(request),
        "title": "Fleet",
        **_context(request),
    }
    return TemplateResponse(request, "admin/virtual_llms/fleet/fleet.html", context)


def rows(request: HttpRequest) -> HttpResponseBase:
    """The fragment htmx swaps in at each refresh."""
    if not _allowed(request):
        return HttpResponse("You may not see the fleet.", status=403, content_type="text/plain")
    return TemplateResponse(request, "admin/virtual_llms/fleet/fleet_rows.html", _context(request))


def act(request: HttpRequest) -> HttpResponseBase:
    """Drain, undrain or evict one backend (POST: llm, sid, action); answers the fresh
    fragment to htmx, or goes back to the page (a browser without script)."""
    if not request.user.has_perm("virtual_llms.change_backend"):
        return HttpResponse("You may not change backends.", status=403, content_type="text/plain")
    action = request.POST.get("action", "")
    name, sid = request.POST.get("llm", ""), request.POST.get("sid", "")
    if action not in ACTIONS:
        return HttpResponse(f"Unknown action {action!r}.", status=400, content_type="text/plain")
    try:
        backend = backends.backend_get(name=name, session_id=sid)
    except ApiError as e:
        return HttpResponse(e.message, status=e.status, content_type="text/plain")
    if action == "evict":
        backends.backend_evict(backend=backend)
        done = f"Evicted the backend {sid} of {name}."
    else:
        backends.backend_set_draining(backend=backend, draining=action == "drain")
        done = f"{'Draining' if action == 'drain' else 'Ended the drain of'} {sid} of {name}."
    if request.headers.get("HX-Request") == "true":
        context = {**_context(request), "done": done}
        return TemplateResponse(request, "admin/virtual_llms/fleet/fleet_rows.html", context)
    messages.success(request, done)
    return redirect("mcpd-fleet")


def _logged_out_htmx(
    view: Callable[[HttpRequest], HttpResponseBase],
) -> Callable[[HttpRequest], HttpResponseBase]:
    """htmx's calls of a page whose login has expired: the whole page goes to the login
    (HX-Redirect), rather than the login form being swapped into the table."""

    @wraps(view)
    def wrapped(request: HttpRequest) -> HttpResponseBase:
        if request.headers.get("HX-Request") == "true" and not admin.site.has_permission(request):
            login = reverse("admin:login")
            return HttpResponseClientRedirect(f"{login}?next={reverse('mcpd-fleet')}")
        return view(request)

    return wrapped


def urls() -> list[URLPattern]:
    """The page's routes, under /admin/fleet/ (mcpd_site/urls.py puts them before the
    admin's own), behind the admin's login."""
    view = admin.site.admin_view
    return [
        path("admin/fleet/", view(require_GET(page)), name="mcpd-fleet"),
        path(
            "admin/fleet/rows/",
            _logged_out_htmx(view(require_GET(rows))),
            name="mcpd-fleet-rows",
        ),
        path(
            "admin/fleet/backend/",
            _logged_out_htmx(view(require_POST(act))),
            name="mcpd-fleet-backend",
        ),
    ]

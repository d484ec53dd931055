"""The admin's Usage page: totals per token and per model over a chosen period, and a chart of
requests and tokens per day, drawn server-side as SVG (no script, works offline)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone

from . import usage
from .models import UsageRecord

# The periods the page offers, in days; the first is the default.
PERIODS = (7, 1, 30, 90)
# The chart's drawing area, in SVG units.
WIDTH, HEIGHT, LEFT, BOTTOM = 720, 220, 48, 28


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: str
    requests: int
    tokens: int


def chart(since: datetime, until: datetime) -> dict[str, Any]:
    """Every UTC day of the period with its requests (bars) and tokens (a line)."""
    by_day = {row.key: row for row in usage.summary(since, until, "day")}
    days = []
    day = since.astimezone(UTC).date()
    while day <= until.astimezone(UTC).date():
        days.append(day.isoformat())
        day += timedelta(days=1)
    requests = [by_day[d].requests if d in by_day else 0 for d in days]
    tokens = [
        by_day[d].prompt_tokens + by_day[d].completion_tokens if d in by_day else 0 for d in days
    ]
    top_requests, top_tokens = max(requests, default=0) or 1, max(tokens, default=0) or 1
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - 8
    step = plot_w / max(1, len(days))
    bars, points = [], []
    for i, d in enumerate(days):
        h = plot_h * requests[i] / top_requests
        x = LEFT + i * step
        bars.append(Bar(x + step * 0.15, 8 + plot_h - h, step * 0.7, h, d, requests[i], tokens[i]))
        points.append(f"{x + step / 2:.1f},{8 + plot_h - plot_h * tokens[i] / top_tokens:.1f}")
    labels = [b for i, b in enumerate(bars) if i % max(1, len(bars) // 8) == 0]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "base": 8 + plot_h,
        "bars": bars,
        "labels": labels,
        "line": " ".join(points),
        "top_requests": max(requests, default=0),
        "top_tokens": max(tokens, default=0),
    }


class UsageAdmin(admin.ModelAdmin[UsageRecord]):
    """No list of rows: the changelist is the Usage page."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        if not self.has_view_permission(request):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        try:
            days = int(request.GET.get("days", PERIODS[0]))
        except ValueError:
            days = PERIODS[0]
        days = days if days in PERIODS else PERIODS[0]
        until = timezone.now()
        since = until - timedelta(days=days)
        by_token = usage.summary(since, until, "token")
        by_model = usage.summary(since, until, "model")
        context = {
            **self.admin_site.each_context(request),
            "title": "Usage",
            "opts": self.model._meta,
            "days": days,
            "periods": PERIODS,
            "since": since,
            "until": until,
            "by_token": by_token,
            "by_model": by_model,
            "total_requests": sum(r.requests for r in by_token),
            "total_errors": sum(r.errors for r in by_token),
            "total_prompt": sum(r.prompt_tokens for r in by_token),
            "total_completion": sum(r.completion_tokens for r in by_token),
            "chart": chart(since, until),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/virtual_llms/usagerecord/usage.html", context)


admin.site.register(UsageRecord, UsageAdmin)

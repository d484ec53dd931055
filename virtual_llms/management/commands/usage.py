"""``manage.py usage [--since 7d] [--until ...] [--by token|model|day]``: the usage table of
GET /api/v1/usage, as text for cron mail."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from virtual_llms import usage

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def instant(text: str, now: datetime) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` before ``now``, or an ISO 8601 time (UTC if naive)."""
    match = re.fullmatch(r"(\d+)([mhdw])", text.strip())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        value = parse_datetime(text)
    except ValueError:
        value = None
    if value is None:
        raise CommandError(f"not a duration (7d, 12h, 30m) or an ISO time: {text!r}")
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Print requests, errors and tokens per client token, model or day."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", default="24h", help="7d, 12h, 30m or an ISO time")
        parser.add_argument("--until", default=None, help="the same; default: now")
        parser.add_argument("--by", choices=usage.GROUPS, default="token")

    def handle(self, *args: Any, since: str, until: str | None, by: str, **options: Any) -> None:
        now = timezone.now()
        end = instant(until, now) if until else now
        start = instant(since, end)
        if start > end:
            raise CommandError("--since must not be after --until")
        rows = usage.summary(start, end, by)
        self.stdout.write(f"Usage by {by}, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
        header = (by, "requests", "errors", "prompt", "completion")
        table = [header] + [
            (r.key, str(r.requests), str(r.errors), str(r.prompt_tokens), str(r.completion_tokens))
            for r in rows
        ]
        totals = (
            "total",
            str(sum(r.requests for r in rows)),
            str(sum(r.errors for r in rows)),
            str(sum(r.prompt_tokens for r in rows)),
            str(sum(r.completion_tokens for r in rows)),
        )
        table.append(totals)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            self.stdout.write("  ".join(cells).rstrip())

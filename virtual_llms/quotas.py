"""Quotas per owner (issue 29): how many names and sessions one owner's publisher tokens
may hold, checked in the register transaction; and the sweep of sessions that own nothing.

Without them one token could register 10,240 names (a 6 MB `GET /api/v1/llms`) or leave
thousands of empty sessions behind. Both limits are settings (MCPD_MAX_NAMES_PER_OWNER,
MCPD_MAX_SESSIONS_PER_OWNER); past either a register gets 409 ``quota_exceeded`` and
applies nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import QuerySet

from .errors import ApiError, unavailable
from .models import ApiToken, Backend, ProviderSession, Role
from .state import get_state


def owner_tokens(token: ApiToken) -> QuerySet[ApiToken]:
    """The publisher tokens of ``token``'s owner (itself, without an owner)."""
    if token.owner:
        return ApiToken.objects.filter(role=Role.PUBLISHER, owner=token.owner)
    return ApiToken.objects.filter(pk=token.pk)


def _refuse(what: str, limit: int, setting: str) -> ApiError:
    return ApiError(
        409,
        "quota_exceeded",
        f"This owner already holds {limit} {what}, the most {setting} allows; "
        "withdraw some (or ask an operator to raise it).",
    )


def check_new_session(token: ApiToken) -> None:
    limit = settings.MCPD_MAX_SESSIONS_PER_OWNER
    if ProviderSession.objects.filter(token__in=owner_tokens(token)).count() >= limit:
        raise _refuse("sessions", limit, "MCPD_MAX_SESSIONS_PER_OWNER")


def check_names(token: ApiToken, names: list[str]) -> None:
    """``names`` may be registered: with the names the owner holds, within the quota."""
    limit = settings.MCPD_MAX_NAMES_PER_OWNER
    owned = Backend.objects.filter(token__in=owner_tokens(token))
    new = set(names) - set(owned.filter(llm__name__in=names).values_list("llm__name", flat=True))
    if not new:  # a re-register of what it holds: two small reads, no count
        return
    if owned.values("llm_id").distinct().count() + len(new) > limit:
        raise _refuse("names", limit, "MCPD_MAX_NAMES_PER_OWNER")


def sweep_empty_sessions(now: datetime) -> int:
    """Delete sessions older than the retention window that serve no name and hold no
    stream. Returns how many (0 when the shared state cannot say who holds a stream)."""
    cutoff = now - timedelta(seconds=settings.MCPD_INACTIVE_RETENTION_SECONDS)
    empty = ProviderSession.objects.filter(created_at__lt=cutoff, backends__isnull=True)
    sids = list(empty.values_list("pk", flat=True))
    if not sids:
        return 0
    try:
        held = get_state().presence.held_sync(sids)
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        return 0
    deleted, _ = ProviderSession.objects.filter(
        pk__in=[sid for sid in sids if sid not in held], backends__isnull=True
    ).delete()
    return deleted

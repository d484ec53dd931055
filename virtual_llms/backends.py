"""Backends: the sessions serving a virtual row's name (PROTOCOL.md v1.1 "Pools") - the
row's fields derived from them, owners, drain and the eviction of one backend.

A virtual row's own ``status``, ``inactive_since``, ``last_heartbeat_at``,
``provider_session_id``, ``publisher_token`` and ``model`` are what v1 readers see. Every
write to a row's backends re-derives them (:func:`derive`) in the same transaction. A row
that is not a pool has exactly one backend and stays its authority for status and
heartbeat, as in v1 (docs/design.md "Fleets": the row cache, gcsweep and the wake read the
row's own columns), so a write to the row alone is seen as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .errors import ApiError
from .models import (
    Backend,
    Llm,
    LlmKind,
    LlmStatus,
    ProviderSession,
    is_llm_name,
    is_session_id,
)
from .state import name_field


def llm_touch(*fields: str) -> None:
    """services.llm_touch (imported late: services imports this module)."""
    from .services import llm_touch as touch

    touch(*fields)


def mirror(row: Llm) -> None:
    """A virtual row written without services (the ORM, fixtures, a v1 import) gets the one
    backend v1 implied: its session's, with the row's own fields."""
    if getattr(row, "mcpd_managed", False):
        return  # services write its backends themselves
    if row.kind != LlmKind.VIRTUAL or row.provider_session_id is None:
        return
    session = ProviderSession.objects.filter(pk=row.provider_session_id).first()
    if session is None or Backend.objects.filter(llm=row).exists():
        return
    Backend.objects.create(
        llm=row,
        session=session,
        token_id=session.token_id,
        model=row.model,
        status=row.status,
        withdrawn=row.withdrawn,
        last_heartbeat_at=row.last_heartbeat_at,
        inactive_since=row.inactive_since,
    )


def _status(backends: list[Backend]) -> str:
    statuses = {b.status for b in backends}
    for status in (LlmStatus.ACTIVE, LlmStatus.HIBERNATING):
        if status in statuses:
            return status
    return LlmStatus.INACTIVE


def derive(row: Llm, *, now: datetime | None = None) -> bool:
    """Set the row's fields from its backends (read now) and write them if they changed.
    Returns whether anything a request routes by changed (status, session, model). The
    caller touches the row's stamps."""
    backends = list(Backend.objects.filter(llm=row).order_by("created_at", "pk"))
    if not backends:
        return False
    live = [b for b in backends if b.status != LlmStatus.INACTIVE]
    if live:
        primary = live[0]  # the oldest live backend, for v1 readers and the wake
        inactive_since = None
        beats = [b.last_heartbeat_at for b in live if b.last_heartbeat_at is not None]
    else:
        primary = max(backends, key=lambda b: (b.inactive_since or now or timezone.now(), b.pk))
        inactive_since = primary.inactive_since
        beats = [primary.last_heartbeat_at] if primary.last_heartbeat_at else []
    fields = {
        "status": _status(backends),
        "inactive_since": inactive_since,
        "provider_session_id": primary.session_id,
        "publisher_token_id": primary.token_id,
        "model": primary.model,
        "withdrawn": all(b.withdrawn for b in backends),
        "last_heartbeat_at": max(beats) if beats else row.last_heartbeat_at,
    }
    changed: dict[str, Any] = {n: v for n, v in fields.items() if getattr(row, n) != v}
    if not changed:
        return False
    routed = bool({"status", "provider_session_id", "model"} & set(changed))
    for name, value in changed.items():
        setattr(row, name, value)
    if routed:
        row.version += 1
        changed["version"] = F("version") + 1
    # An UPDATE, not save(): a row another transaction deleted meanwhile stays deleted. The
    # caller touches the row's stamps once for all it wrote (services.llm_touch).
    Llm.objects.filter(pk=row.pk).update(**changed, updated_at=timezone.now())
    return routed


def derive_many(llm_ids: Iterable[uuid.UUID]) -> None:
    """derive() for each of these rows."""
    for row in Llm.objects.filter(pk__in=list(llm_ids)):
        derive(row)


def backend_get(*, name: str, session_id: str, lock: bool = False) -> Backend:
    """The backend of session ``session_id`` for the row ``name``, or ApiError 404."""
    qs = Backend.objects.select_related("llm", "token")
    if lock:
        qs = qs.select_for_update()
    possible = is_llm_name(name) and is_session_id(session_id)  # else no lookup: none has it
    backend = qs.filter(llm__name=name, session_id=session_id).first() if possible else None
    if backend is None:
        raise ApiError(
            404, "backend_not_found", f"No backend of '{name}' for session '{session_id}'."
        )
    return backend


def backend_set_draining(*, backend: Backend, draining: bool) -> Backend:
    """Drain a backend (no new task; the ones it runs finish) or end its drain."""
    with transaction.atomic():
        Backend.objects.filter(pk=backend.pk).update(draining=draining)
        backend.draining = draining
        llm_touch(name_field(backend.llm.name))
    return backend


def backend_evict(*, backend: Backend) -> None:
    """Take one backend out of its pool now (its session re-joins at its next register);
    the row goes with its last backend (services.llm_evict)."""
    from .services import llm_evict

    row, sid = backend.llm, backend.session_id
    with transaction.atomic():
        if not Backend.objects.filter(llm=row).exclude(pk=backend.pk).exists():
            last = True
        else:
            last = False
            backend.delete()
            derive(row)
            llm_touch(name_field(row.name))
    if last:
        llm_evict(llm=row)
        return
    from . import events  # the channel layer is only touched there
    from .errors import unavailable

    # Its tasks in flight fail with 502 llm_evicted, as a row's do (hub.Hub). With Redis
    # away the eviction stands; those tasks end with the publisher's answer or a timeout.
    try:
        events.broadcast_sync({"type": "backend.evicted", "llmId": str(row.pk), "sid": sid})
    except Exception as exc:
        if unavailable(exc) is None:
            raise

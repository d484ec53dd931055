"""Reads of the registry."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from .errors import unavailable
from .models import Backend, Llm, is_llm_name
from .serializers import backend_json as _backend_json
from .state import get_state


def llm_get(*, name: str) -> Llm | None:
    """The row called ``name`` with its backends."""
    if not is_llm_name(name):
        return None  # no row can have it (a NUL byte would even fail PostgreSQL's lookup)
    return Llm.objects.prefetch_related("backends").filter(name=name).first()


def llm_list() -> QuerySet[Llm]:
    """Every row, for ``GET /api/v1/llms``: a row's own columns say all the list shows (a
    pool's are derived from its backends as they change: backends.mirror), so its backends
    are not read."""
    return Llm.objects.all()


def llm_callable_get(*, name: str) -> Llm | None:
    """The row ``GET /v1/models/<name>`` shows, if listed."""
    if not is_llm_name(name):
        return None
    return llm_list_callable().filter(name=name).first()


def llm_list_callable() -> QuerySet[Llm]:
    """What ``GET /v1/models`` shows: active and hibernating LLMs."""
    return Llm.objects.listed().only("name", "created_at", "kind")


def llm_ids_of_session(*, session_id: str) -> list[str]:
    """The ids of the rows the session serves (as one of their backends)."""
    ids = Backend.objects.filter(session_id=session_id).values_list("llm_id", flat=True)
    return [str(i) for i in ids]


def _in_flight(llm_id: str, sids: list[str]) -> dict[str, int]:
    """Tasks in flight per backend, across workers; zeros when the shared state is away."""
    try:
        return get_state().slots.counts_sync(llm_id, sids)
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        return {}


def backends_json(row: Llm, *, token_id: int | None = None) -> list[dict[str, Any]]:
    """The row's ``backends`` with live ``inFlight`` (one read of the shared state);
    ``token_id``: only that publisher token's."""
    rows = [b for b in row.backends.all() if token_id is None or b.token_id == token_id]
    counts = _in_flight(str(row.pk), [b.session_id for b in rows]) if rows else {}
    return [_backend_json(b, counts.get(b.session_id, 0)) for b in rows]


def backend_json(backend: Backend) -> dict[str, Any]:
    counts = _in_flight(str(backend.llm_id), [backend.session_id])
    return _backend_json(backend, counts.get(backend.session_id, 0))

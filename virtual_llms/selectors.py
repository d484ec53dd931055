"""Reads of the registry."""

from __future__ import annotations

from django.db.models import QuerySet

from .models import Llm, is_llm_name


def llm_get(*, name: str) -> Llm | None:
    if not is_llm_name(name):
        return None  # no row can have it (a NUL byte would even fail PostgreSQL's lookup)
    return Llm.objects.filter(name=name).first()


def llm_list() -> QuerySet[Llm]:
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
    """The ids of the rows the session serves."""
    ids = Llm.objects.filter(provider_session_id=session_id).values_list("id", flat=True)
    return [str(i) for i in ids]

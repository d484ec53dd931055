"""This process's cache of LLM rows on the request path, and what the relay needs of a row
(:class:`LlmRef`, with its backends). A cached row is used without a round trip: the
script that routes its task checks the row's stamps (state/routing.py) and says when the
copy is stale, and only then is the row read again."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError

from . import selectors
from .errors import ApiError
from .models import Llm, LlmKind, LlmStatus, is_llm_name
from .state import Candidate, get_state

# A cached row is re-read at least this often even if no stamp changed: the bound on how long
# a write made behind mcpd's back (raw SQL, a lost stamp update) can go unseen. While the
# database is unreachable, the copy is used past it (llm_lookup).
ROW_CACHE_SECONDS = 10.0
# Entries for rows this process asked for; past this many the cache starts over.
ROW_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class BackendRef:
    """One backend of a virtual row: a session serving the name."""

    sid: str
    token_id: int
    model: str
    slots: int | None  # its maxConcurrency; None: no limit
    status: str
    draining: bool = False


@dataclass(frozen=True)
class LlmRef:
    """What the relay needs of a virtual row, read once per request: the row's own fields
    (its primary session, for the wake and for v1 readers) and its backends."""

    id: uuid.UUID
    name: str
    model: str
    status: str
    session_id: str
    token_id: int
    backends: tuple[BackendRef, ...] = ()
    # The stamps the row was read under ("": unknown; routing then finds it stale).
    stamp: str = ""

    def candidates(self) -> list[Candidate]:
        """The backends a task may go to: the active ones (draining ones count as live)."""
        return [
            Candidate(b.sid, b.token_id, b.slots, b.draining)
            for b in self.backends
            if b.status == LlmStatus.ACTIVE
        ]

    def models(self) -> dict[str, str]:
        """The upstream model of each backend whose model is not the row's."""
        return {b.sid: b.model for b in self.backends if b.model != self.model}


def _backends(row: Llm) -> tuple[BackendRef, ...]:
    # A row that is not a pool is its one backend's authority for its status, as in v1 (a
    # write to the row alone, by SQL or an old tool, is seen); a pool's backends are theirs.
    backends = tuple(
        BackendRef(
            b.session_id,
            b.token_id,
            b.model,
            b.max_concurrency,
            b.status if row.pool else row.status,
            b.draining,
        )
        for b in row.backends.all()
    )
    if backends:
        return backends
    # A row without backend rows (written behind the services' back): the one it implies.
    assert row.provider_session_id is not None
    assert row.publisher_token_id is not None
    return (
        BackendRef(row.provider_session_id, row.publisher_token_id, row.model, None, row.status),
    )


def ref_of(row: Llm, stamp: str = "") -> LlmRef:
    assert row.provider_session_id is not None
    assert row.publisher_token_id is not None
    return LlmRef(
        id=row.id,
        name=row.name,
        model=row.model,
        status=row.status,
        session_id=row.provider_session_id,
        token_id=row.publisher_token_id,
        backends=_backends(row),
        stamp=stamp,
    )


@dataclass(frozen=True)
class CachedRow:
    row: Llm
    stamp: str
    read_at: float
    ref: LlmRef | None  # for a virtual row

    def fresh(self) -> bool:
        return time.monotonic() - self.read_at < ROW_CACHE_SECONDS


_rows: dict[str, CachedRow] = {}


def cached(name: str) -> CachedRow | None:
    """The fresh cached entry for ``name``, if any."""
    entry = _rows.get(name)
    return entry if entry is not None and entry.fresh() else None


def reset() -> None:
    """Forget every cached row (tests that switch databases or state)."""
    _rows.clear()


async def llm_lookup(name: str, stamp: str | None = None) -> CachedRow | None:
    """The row called ``name``, read from the database and cached under the stamps it was
    read under: ``stamp`` when routing just read them (they came back with a "stale"
    verdict), else read now. None if there is no such row."""
    if not is_llm_name(name):
        return None  # no row has it: no round trip, no read
    if stamp is None:
        stamp = await get_state().routing.stamp(name)
    # Read after the stamps: a write that commits later touches them again.
    try:
        row = await sync_to_async(selectors.llm_get)(name=name)
    except (OperationalError, InterfaceError):
        # The database is away (a restart): a copy read under the same stamps is still the
        # row (no write through mcpd since; none can commit now), so the relay goes on.
        # Its age stays, so the next request tries the database again.
        old = _rows.get(name)
        if old is not None and old.stamp == stamp:
            return old
        raise  # a 503 database_unavailable (errors.unavailable)
    if row is None:
        _rows.pop(name, None)
        return None
    ref = ref_of(row, stamp) if row.kind == LlmKind.VIRTUAL else None
    entry = CachedRow(row, stamp, time.monotonic(), ref)
    if len(_rows) >= ROW_CACHE_SIZE:
        _rows.clear()
    _rows[name] = entry
    return entry


async def lookup(name: str) -> CachedRow | None:
    """The row called ``name``: the cached copy while fresh (routing checks its stamps), or
    read now."""
    return cached(name) or await llm_lookup(name)


async def checked(name: str) -> CachedRow | None:
    """The row called ``name`` as the next request sees it: the cached copy while it is
    fresh and its stamps are current (one round trip), else read again."""
    stamp = await get_state().routing.stamp(name)
    entry = cached(name)
    if entry is not None and entry.stamp == stamp:
        return entry
    return await llm_lookup(name, stamp)


async def load_virtual(name: str) -> LlmRef:
    """The virtual row called ``name`` (checked), or ApiError 404 / 400 for a public row."""
    entry = await checked(name)
    if entry is None:
        raise ApiError(404, "model_not_found", f"The model '{name}' does not exist.")
    if entry.ref is None:
        raise ApiError(400, "not_virtual", f"'{name}' is not a virtual provider.")
    return entry.ref


async def reload(name: str) -> LlmRef | None:
    """The virtual row called ``name`` as it is now (checked), or None if it is gone."""
    try:
        return await load_virtual(name)
    except ApiError:
        return None

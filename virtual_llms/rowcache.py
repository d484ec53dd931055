"""This process's cache of LLM rows on the request path, validated against the stamps in the
shared state (state/stamps.py) on every request, in the same round trip that reads who holds
the row's session stream; and what the relay needs of a virtual row (:class:`LlmRef`)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async

from . import selectors
from .errors import ApiError
from .models import Llm, LlmKind
from .state import Presence, get_state

# A cached row is re-read at least this often even if no stamp changed: the bound on how long
# a write made behind mcpd's back (raw SQL, a lost stamp update) can go unseen.
ROW_CACHE_SECONDS = 10.0
# Entries for rows this process asked for; past this many the cache starts over.
ROW_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class LlmRef:
    """What the relay needs of a virtual row, read once per request."""

    id: uuid.UUID
    name: str
    model: str
    status: str
    session_id: str
    token_id: int


def ref_of(row: Llm) -> LlmRef:
    assert row.provider_session_id is not None
    assert row.publisher_token_id is not None
    return LlmRef(
        id=row.id,
        name=row.name,
        model=row.model,
        status=row.status,
        session_id=row.provider_session_id,
        token_id=row.publisher_token_id,
    )


@dataclass(frozen=True)
class CachedRow:
    row: Llm
    stamp: str
    read_at: float
    # Who held the row's session stream at the last lookup (tasks.open_cached's expectation).
    presence: Presence | None = None

    def fresh(self) -> bool:
        return time.monotonic() - self.read_at < ROW_CACHE_SECONDS


_rows: dict[str, CachedRow] = {}


def cached(name: str) -> CachedRow | None:
    """The cached entry for ``name``, if any (fresh or not)."""
    return _rows.get(name)


def reset() -> None:
    """Forget every cached row (tests that switch databases or state)."""
    _rows.clear()


Checked = tuple[str, Presence | None]


async def llm_lookup(
    name: str, checked: Checked | None = None
) -> tuple[Llm | None, Presence | None]:
    """The row called ``name`` and who holds its session's stream, in one round trip to the
    shared state when the row is cached here: the cached copy is used only while the stamps
    of its name, its session and "everything" are those it was read under (services touch
    them on every write). Otherwise one row read on the ORM thread. ``checked``: the stamps
    and holder open_cached just read for the cached row's session (no second round trip for
    them)."""
    dispatch = get_state().dispatch
    entry = _rows.get(name)
    sid = (entry.row.provider_session_id or "") if entry is not None else ""
    row: Llm | None = None
    for _ in range(3):
        stamp, presence = checked or await dispatch.check(name, sid)
        checked = None
        if entry is not None and entry.fresh() and entry.stamp == stamp:
            if entry.presence != presence:
                _rows[name] = dataclasses.replace(entry, presence=presence)
            return entry.row, presence
        # Read after the stamps: a write that commits later touches them again.
        row = await sync_to_async(selectors.llm_get)(name=name)
        if row is None:
            _rows.pop(name, None)
            return None, None
        row_sid = row.provider_session_id or ""
        if row_sid == sid:
            if len(_rows) >= ROW_CACHE_SIZE:
                _rows.clear()
            _rows[name] = CachedRow(row, stamp, time.monotonic(), presence)
            return row, presence
        # The row moved to another session: read that session's stamp, then the row again.
        entry, sid = None, row_sid
    # Still moving after three reads: serve the last one uncached.
    return row, (await get_state().presence.lookup(sid) if sid else None)


async def load_virtual(name: str) -> LlmRef:
    """The virtual row called ``name`` (one read), or ApiError 404 / 400 for a public row."""
    row = await sync_to_async(selectors.llm_get)(name=name)
    if row is None:
        raise ApiError(404, "model_not_found", f"The model '{name}' does not exist.")
    if row.kind != LlmKind.VIRTUAL:
        raise ApiError(400, "not_virtual", f"'{name}' is not a virtual provider.")
    return ref_of(row)


async def reload(name: str) -> LlmRef | None:
    """The virtual row called ``name`` read again, or None if it is gone."""
    try:
        return await load_virtual(name)
    except ApiError:
        return None

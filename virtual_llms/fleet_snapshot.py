"""Every LLM with its backends as the whole broker sees them now, read at once: two database
queries (rows, backends) and one read of the shared state (state/snapshot.py), however many
rows — for the /metrics gauges (metrics.py), the same from any worker, and the admin's Fleet
page (fleet_admin.py, ``detail=True``: also who holds each stream and the wakes running)."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from . import models
from .models import Llm, LlmKind, LlmStatus
from .state import get_state
from .state.snapshot import HELD_DRAINING, HELD_NONE, fleet_sync

# A backend's state as /metrics reports it (mcpd_backends{status}): its row's status, unless
# it is live but holds no stream ("disconnected") or takes no new task ("draining").
BACKEND_STATES = ("active", "hibernating", "draining", "disconnected", "inactive")


@dataclass(frozen=True)
class BackendView:
    session_id: str
    status: str  # the backend's status in the registry
    slots: int | None  # its maxConcurrency; None: no limit
    draining: bool  # drained by an admin, or its stream is on a draining worker
    held: bool  # its session holds a stream on a live worker
    in_flight: int
    presence: str = ""  # with detail: "<hub channel> <epoch>" of its stream, "" when not held

    @property
    def state(self) -> str:
        """One of BACKEND_STATES."""
        if self.status == LlmStatus.INACTIVE:
            return "inactive"
        if not self.held:
            return "disconnected"
        return "draining" if self.draining else self.status


@dataclass(frozen=True)
class LlmView:
    id: uuid.UUID
    name: str
    backends: tuple[BackendView, ...]
    queue_depth: int
    wake: str = ""  # with detail: its wake lease's value while a wake runs, else ""

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)

    @property
    def slots(self) -> float:
        """The slots of the backends that take tasks now (active, held, not draining);
        infinite if one of them has no limit."""
        return sum(
            math.inf if b.slots is None else b.slots
            for b in self.backends
            if b.state == LlmStatus.ACTIVE
        )


@dataclass(frozen=True)
class Snapshot:
    names: frozenset[str]  # every registered name, public rows' too
    llms: tuple[LlmView, ...]  # the virtual rows


def read(*, detail: bool = False) -> Snapshot:
    """The snapshot (sync: the ORM, and the state's sync client): the rows and the backends
    in one query each, as tuples (model instances cost more than the state's read with
    hundreds of rows). As the relay reads them (rowcache.py): a row that is not a pool is
    its one backend's authority for its status, and a row without backend rows (written
    behind the services' back) is the one backend it implies, with no slot limit."""
    rows = list(
        Llm.objects.values_list("id", "name", "kind", "status", "provider_session_id", "pool")
    )
    Backend = tuple[str, str, int | None, bool]  # session, status, slots, drained
    by_llm: dict[uuid.UUID, list[Backend]] = {}
    for llm_id, sid, slots, status, drained in models.Backend.objects.values_list(
        "llm_id", "session_id", "max_concurrency", "status", "draining"
    ):
        by_llm.setdefault(llm_id, []).append((sid, status, slots, drained))
    virtual: list[tuple[uuid.UUID, str, list[Backend]]] = []
    for llm_id, name, kind, status, row_sid, pool in rows:
        if kind != LlmKind.VIRTUAL:
            continue
        backends = by_llm.get(llm_id) or [(row_sid or "", status, None, False)]
        if not pool:
            backends = [(b_sid, status, slots, drained) for b_sid, _, slots, drained in backends]
        virtual.append((llm_id, name, backends))
    states = fleet_sync(
        get_state(),
        [(str(llm_id), [b[0] for b in backends]) for llm_id, _, backends in virtual],
        detail=detail,
    )
    llms = []
    for (llm_id, name, backends), state in zip(virtual, states, strict=True):
        views = tuple(
            BackendView(
                session_id=sid,
                status=status,
                slots=slots,
                draining=drained or held == HELD_DRAINING,
                held=held != HELD_NONE,
                in_flight=in_flight,
                presence=state.presence[i] if state.presence else "",
            )
            for i, ((sid, status, slots, drained), (held, in_flight)) in enumerate(
                zip(backends, state.backends, strict=True)
            )
        )
        llms.append(LlmView(llm_id, name, views, state.queue_depth, state.wake))
    return Snapshot(frozenset(row[1] for row in rows), tuple(llms))

"""The fleet as the shared state sees it, in one read (one Lua script with Redis): per LLM,
its queue's length, and per backend whether its stream is held on a live worker and its
tasks in flight; with ``detail``, also who holds each stream (its presence record) and the
LLM's wake lease. For readers that look at everything at once (the /metrics gauges, the
admin's Fleet page)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import SharedState
from .base import encode_presence

HELD_NONE, HELD, HELD_DRAINING = 0, 1, 2


@dataclass(frozen=True)
class LlmState:
    queue_depth: int
    backends: tuple[tuple[int, int], ...]  # per backend, in order: (held, tasks in flight)
    # With detail: per backend, its presence record ("<hub channel> <epoch>", "" when not
    # held), and the wake lease's value ("<epoch> <holder>", "" when no wake runs).
    presence: tuple[str, ...] = ()
    wake: str = ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fleet_sync(
    state: SharedState, llms: Sequence[tuple[str, Sequence[str]]], *, detail: bool = False
) -> list[LlmState]:
    """For each (LLM id, its backends' session ids), in order (from sync code)."""
    if not llms:
        return []
    if state.conn is None:  # one process: its stores, which cost no I/O
        depths = state.routing.depths_sync([llm_id for llm_id, _ in llms])
        found = []
        for llm_id, sids in llms:
            held = state.presence.held_sync(list(sids))
            counts = state.slots.counts_sync(llm_id, list(sids))
            presence: tuple[str, ...] = ()
            wake = ""
            if detail:
                peek = getattr(state.presence, "peek_sync", None)
                records = [peek(sid) if peek and sid in held else None for sid in sids]
                presence = tuple(encode_presence(p) if p else "" for p in records)
                lease = getattr(state.leases, "peek_sync", None)
                wake = lease(f"wake:{llm_id}") if lease else ""
            found.append(
                LlmState(
                    depths[llm_id],
                    tuple((HELD if sid in held else HELD_NONE, counts[sid]) for sid in sids),
                    presence,
                    wake,
                )
            )
        return found
    args: list[str | int] = [state.conn.prefix, "1" if detail else "0", len(llms)]
    for llm_id, sids in llms:
        args += [llm_id, len(sids), *sids]
    flat = state.conn.sync_script("fleet_snapshot")(keys=[], args=args)
    found, at = [], 0
    step = 3 if detail else 2
    for _, sids in llms:
        depth, at = int(flat[at]), at + 1
        if detail:
            wake, at = _text(flat[at]), at + 1
        backends = tuple(
            (int(flat[at + step * b]), int(flat[at + step * b + 1])) for b in range(len(sids))
        )
        presence = tuple(_text(flat[at + step * b + 2]) for b in range(len(sids))) if detail else ()
        at += step * len(sids)
        found.append(LlmState(depth, backends, presence, wake if detail else ""))
    return found

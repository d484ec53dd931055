"""The fleet as the shared state sees it, in one read (one Lua script with Redis): per LLM,
its queue's length, and per backend whether its stream is held on a live worker and its
tasks in flight. For readers that look at everything at once (the /metrics gauges)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import SharedState

HELD_NONE, HELD, HELD_DRAINING = 0, 1, 2


@dataclass(frozen=True)
class LlmState:
    queue_depth: int
    backends: tuple[tuple[int, int], ...]  # per backend, in order: (held, tasks in flight)


def fleet_sync(state: SharedState, llms: Sequence[tuple[str, Sequence[str]]]) -> list[LlmState]:
    """For each (LLM id, its backends' session ids), in order (from sync code)."""
    if not llms:
        return []
    if state.conn is None:  # one process: its stores, which cost no I/O
        depths = state.routing.depths_sync([llm_id for llm_id, _ in llms])
        found = []
        for llm_id, sids in llms:
            held = state.presence.held_sync(list(sids))
            counts = state.slots.counts_sync(llm_id, list(sids))
            found.append(
                LlmState(
                    depths[llm_id],
                    tuple((HELD if sid in held else HELD_NONE, counts[sid]) for sid in sids),
                )
            )
        return found
    args: list[str | int] = [state.conn.prefix, len(llms)]
    for llm_id, sids in llms:
        args += [llm_id, len(sids), *sids]
    flat = [int(v) for v in state.conn.sync_script("fleet_snapshot")(keys=[], args=args)]
    found, at = [], 0
    for _, sids in llms:
        depth, at = flat[at], at + 1
        backends = tuple((flat[at + 2 * b], flat[at + 2 * b + 1]) for b in range(len(sids)))
        at += 2 * len(sids)
        found.append(LlmState(depth, backends))
    return found

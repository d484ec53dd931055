"""Rows of the result table, goals, and rendering (a Markdown table, printed and saved)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    setup: str
    transport: str
    line: str
    metric: str
    unit: str
    direct: float | None = None
    relayed: float | None = None
    added: float | None = None
    goal: str = ""
    verdict: str = ""
    note: str = ""
    windows: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Check = Callable[[Row], bool]


def at_most(limit: float, attr: str = "added") -> Check:
    def check(row: Row) -> bool:
        value = getattr(row, attr)
        return value is not None and not math.isnan(value) and value <= limit

    return check


def at_least(limit: float, attr: str = "relayed") -> Check:
    def check(row: Row) -> bool:
        value = getattr(row, attr)
        return value is not None and not math.isnan(value) and value >= limit

    return check


def judge(row: Row, goal: str, check: Check, *, applies: bool = True) -> Row:
    """Set the goal and the verdict; ``applies=False`` (counts smaller than the goal's, as
    in a quick run) records the goal without judging it."""
    row.goal = goal
    if applies:
        row.verdict = "PASS" if check(row) else "FAIL"
    else:
        row.verdict = "n/j"
        row.note = (row.note + "; " if row.note else "") + "not judged: counts below the goal's"
    return row


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    if unit in ("ms", "KiB") or abs(value) < 100:
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:,.0f}"


def markdown(rows: list[Row]) -> str:
    head = (
        "| setup | transport | publisher | metric | direct | relayed | added | goal | verdict "
        "| notes |\n|---|---|---|---|--:|--:|--:|---|---|---|"
    )
    lines = [head]
    for r in rows:
        metric = f"{r.metric} ({r.unit})" if r.unit else r.metric
        lines.append(
            f"| {r.setup} | {r.transport} | {r.line} | {metric} | {fmt(r.direct, r.unit)} "
            f"| {fmt(r.relayed, r.unit)} | {fmt(r.added, r.unit)} | {r.goal} "
            f"| {r.verdict} | {r.note} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    judged = [r for r in rows if r.verdict in ("PASS", "FAIL")]
    failed = [r for r in judged if r.verdict == "FAIL"]
    out = [f"goals: {len(judged) - len(failed)} PASS, {len(failed)} FAIL"]
    for r in failed:
        out.append(f"  FAIL {r.setup} / {r.transport} / {r.line}: {r.metric} — goal {r.goal}")
    return "\n".join(out)

"""Client limits' counters, shared by all workers: per token, a GCRA window for rpm and one
for tpm, and the set of its requests in flight (lua/limit_admit.lua, lua/limit_end.lua).

A request in flight is ``"<hub channel> <call>"``: the member of a worker that died is
dropped by the next admission that reads it (its liveness key is gone), so a killed worker's
requests stop counting within WORKER_TTL_MS; the set itself expires INFLIGHT_TTL_SECONDS
after the token's last admission, a backstop if Redis lost the liveness keys' meaning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

from .base import TASK_TTL_SECONDS, RedisConn

WINDOW_MS = 60_000.0
# No request holds its place longer than a task's record lives.
INFLIGHT_TTL_SECONDS = TASK_TTL_SECONDS


@dataclass(frozen=True)
class Verdict:
    """An admission's answer. ``refused_by``: "requests", "tokens" or "concurrency" ("" when
    admitted); ``retry_ms``: how long until the request would pass."""

    admitted: bool
    refused_by: str
    retry_ms: int
    requests_left: int
    requests_reset_ms: int
    tokens_left: int
    tokens_reset_ms: int
    in_flight: int = 0  # the token's requests in flight, this one included if admitted


class LimitStore(Protocol):
    async def admit(
        self, token_id: int, rpm: int, tpm: int, max_concurrency: int, member: str
    ) -> Verdict:
        """Check every limit of the token (0: none) and, if all pass, count the request."""

    async def end(self, token_id: int, member: str, tokens: int, tpm: int) -> None:
        """The request ended: its place in flight (``member``, "" for none) is free, and
        ``tokens`` are charged to its tpm window."""


def _verdict(raw: list[object]) -> Verdict:
    return Verdict(
        admitted=int(str(raw[0])) == 1,
        refused_by=str(raw[1]),
        retry_ms=int(str(raw[2])),
        requests_left=int(str(raw[3])),
        requests_reset_ms=int(str(raw[4])),
        tokens_left=int(str(raw[5])),
        tokens_reset_ms=int(str(raw[6])),
        in_flight=int(str(raw[7])),
    )


class RedisLimits:
    def __init__(self, conn: RedisConn) -> None:
        self._conn = conn

    def _keys(self, token_id: int) -> list[str]:
        return [
            self._conn.key("lr", token_id),
            self._conn.key("lt", token_id),
            self._conn.key("lc", token_id),
        ]

    async def admit(
        self, token_id: int, rpm: int, tpm: int, max_concurrency: int, member: str
    ) -> Verdict:
        raw = await self._conn.script("limit_admit")(
            keys=self._keys(token_id),
            args=[
                rpm,
                tpm,
                max_concurrency,
                member,
                self._conn.key("w", ""),
                INFLIGHT_TTL_SECONDS * 1000,
            ],
        )
        return _verdict(raw)

    async def end(self, token_id: int, member: str, tokens: int, tpm: int) -> None:
        _, tpm_key, inflight = self._keys(token_id)
        await self._conn.script("limit_end")(keys=[tpm_key, inflight], args=[member, tokens, tpm])


class MemoryLimits:
    """The same windows in this process's memory (the embedded broker): no worker can die
    under a request without the process dying too."""

    def __init__(self) -> None:
        self._rpm: dict[int, float] = {}
        self._tpm: dict[int, float] = {}
        self._inflight: dict[int, set[str]] = {}

    @staticmethod
    def _now() -> float:
        return time.time() * 1000

    async def admit(
        self, token_id: int, rpm: int, tpm: int, max_concurrency: int, member: str
    ) -> Verdict:
        now = self._now()
        refused, retry = "", 0.0
        rpm_next, rpm_left, rpm_reset = 0.0, 0, 0.0
        tpm_left, tpm_reset = 0, 0.0
        if rpm > 0:
            step = WINDOW_MS / rpm
            tat = max(self._rpm.get(token_id, 0.0), now)
            nxt = tat + step
            if nxt - now > WINDOW_MS + 0.001:
                refused, retry = "requests", nxt - now - WINDOW_MS
                rpm_reset = tat - now
            else:
                rpm_next = nxt
                rpm_left = math.floor((WINDOW_MS - (nxt - now)) / step + 1e-6)
                rpm_reset = nxt - now
        if tpm > 0:
            step = WINDOW_MS / tpm
            used = max(self._tpm.get(token_id, 0.0), now) - now
            tpm_left = max(0, math.floor((WINDOW_MS - used) / step + 1e-6))
            tpm_reset = used
            if tpm_left < 1:
                refused = refused or "tokens"
                retry = max(retry, used - WINDOW_MS + step)
        inflight = self._inflight.setdefault(token_id, set())
        if max_concurrency > 0 and len(inflight) >= max_concurrency:
            refused = refused or "concurrency"
            retry = max(retry, 1000.0)
        if not refused:
            if rpm > 0:
                self._rpm[token_id] = rpm_next
            if max_concurrency > 0:
                inflight.add(member)
        return Verdict(
            in_flight=len(inflight) if max_concurrency > 0 else 0,
            admitted=not refused,
            refused_by=refused,
            retry_ms=math.ceil(retry),
            requests_left=rpm_left,
            requests_reset_ms=math.ceil(rpm_reset),
            tokens_left=tpm_left,
            tokens_reset_ms=math.ceil(tpm_reset),
        )

    async def end(self, token_id: int, member: str, tokens: int, tpm: int) -> None:
        if member:
            self._inflight.get(token_id, set()).discard(member)
        if tokens > 0 and tpm > 0:
            now = self._now()
            self._tpm[token_id] = max(self._tpm.get(token_id, 0.0), now) + tokens * WINDOW_MS / tpm

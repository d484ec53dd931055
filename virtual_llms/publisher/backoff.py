"""Exponential backoff with jitter, for reconnecting to the broker."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``base * factor**n`` seconds, capped, each scaled by a random factor in
    [1 - jitter, 1] so that many publishers cut off at once do not come back in step."""

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter <= 1):
            raise ValueError("need 0 < base <= cap, factor >= 1 and 0 <= jitter <= 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        return ceiling * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempt = 0

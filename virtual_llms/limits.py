"""Client limits: a limited token's requests admitted or refused (429) across all workers,
OpenAI's ``x-ratelimit-*`` headers, and the request's place and tokens given back when it ends.

A token with no limit costs nothing here: no round trip, no header. A limited one costs one
round trip to admit (state/lua/limit_admit.lua checks rpm, tpm and max-concurrency together
and counts the request) and, when it has a tpm or a max-concurrency, one when it ends
(limit_end.lua). The Lua is ours rather than the ``limits`` package's because that package
checks one limit per call (three round trips for three limits), has no limit on requests in
flight, and its async Redis storage needs a second Redis client library (coredis) beside
redis-py; the scripts are 80 lines and share the liveness keys the rest of the state uses.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .errors import ApiError
from .models import ApiToken
from .state import Verdict, get_state

_calls = itertools.count(1)


@dataclass
class Admission:
    """A limited token's admitted request: its headers, and what to give back at its end."""

    token_id: int
    tpm: int
    member: str  # its place among the requests in flight ("" when it holds none)
    headers: dict[str, str] = field(default_factory=dict)


def reset_text(ms: float) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6s``,
    ``1m2s``, ``6m0s``, ``1h0m0s`` (Go's notation)."""
    ms = max(0, round(ms))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def _headers(token: ApiToken, verdict: Verdict) -> dict[str, str]:
    headers: dict[str, str] = {}
    if token.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(token.rpm)
        headers["x-ratelimit-remaining-requests"] = str(verdict.requests_left)
        headers["x-ratelimit-reset-requests"] = reset_text(verdict.requests_reset_ms)
    elif token.max_concurrency is not None:
        # No window of requests: the requests headers tell the places in flight instead
        # (a place is free again when a request ends, so there is nothing to wait for).
        left = max(0, token.max_concurrency - verdict.in_flight)
        headers["x-ratelimit-limit-requests"] = str(token.max_concurrency)
        headers["x-ratelimit-remaining-requests"] = str(left)
        headers["x-ratelimit-reset-requests"] = "0s"
    if token.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(token.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(verdict.tokens_left)
        headers["x-ratelimit-reset-tokens"] = reset_text(verdict.tokens_reset_ms)
    return headers


_REFUSALS = {
    "requests": ("requests", "requests per min (RPM)"),
    "tokens": ("tokens", "tokens per min (TPM)"),
    "concurrency": ("requests", "requests in flight"),
}


def _refusal(token: ApiToken, verdict: Verdict, headers: dict[str, str]) -> ApiError:
    kind, what = _REFUSALS[verdict.refused_by]
    limit = {"requests": token.rpm, "tokens": token.tpm, "concurrency": token.max_concurrency}[
        verdict.refused_by
    ]
    retry = max(1, math.ceil(verdict.retry_ms / 1000))
    message = (
        f"Rate limit reached for {what} on token '{token.label}': limit {limit}. "
        f"Please try again in {reset_text(verdict.retry_ms)}."
    )
    return ApiError(
        429,
        "rate_limit_exceeded",
        message,
        headers={**headers, "Retry-After": str(retry)},
        openai_type=kind,
    )


async def admit(token: ApiToken) -> Admission | None:
    """Admit one request of ``token`` (None, at no cost, when it has no limit), or raise 429
    ``rate_limit_exceeded`` with ``Retry-After``."""
    if not token.limited:
        return None
    concurrency = token.max_concurrency or 0
    member = ""
    if concurrency:
        from .hub import get_hub  # its place in flight is held under this worker's channel

        member = f"{(await get_hub()).channel or '-'} {next(_calls)}"
    verdict = await get_state().limits.admit(
        token.pk, token.rpm or 0, token.tpm or 0, concurrency, member
    )
    headers = _headers(token, verdict)
    if not verdict.admitted:
        raise _refusal(token, verdict, headers)
    return Admission(token.pk, token.tpm or 0, member, headers)


async def end(admission: Admission, tokens: int | None) -> None:
    """The request ended: free its place in flight and charge the ``tokens`` its answer
    reported (prompt + completion) to the token's tpm. No round trip when neither applies."""
    charge = (tokens or 0) if admission.tpm else 0
    if not admission.member and charge <= 0:
        return
    await get_state().limits.end(admission.token_id, admission.member, charge, admission.tpm)

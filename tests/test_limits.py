"""Client limits (virtual_llms/limits.py and state/limits.py): the GCRA windows, the requests
in flight, OpenAI's headers and the 429. The first run of the suite has the in-memory state;
the second has Redis, where the same tests run the Lua scripts."""

from __future__ import annotations

import json
import re

import pytest
from django.conf import settings

from virtual_llms import limits, state
from virtual_llms.errors import ApiError
from virtual_llms.models import ApiToken

_ids = iter(range(10_000, 20_000))


def parse_reset(text: str) -> float:
    """The milliseconds of an x-ratelimit-reset-* value (``1m2.5s``, ``17ms``)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?|(\d+)ms", text)
    assert match, text
    hours, minutes, seconds, ms = match.groups()
    if ms is not None:
        return float(ms)
    return (int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)) * 1000


def token(**fields: int | None) -> ApiToken:
    """An unsaved client token with limits (the stores need only its id)."""
    return ApiToken(pk=next(_ids), role="client", label="team", **fields)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (17, "17ms"),
        (999.6, "1s"),
        (1500, "1.5s"),
        (6000, "6s"),
        (20_000, "20s"),
        (59_999.6, "1m0s"),
        (62_000, "1m2s"),
        (360_000, "6m0s"),
        (3_723_500, "1h2m3.5s"),
    ],
)
def test_reset_is_written_as_openai_does(ms: float, text: str) -> None:
    assert limits.reset_text(ms) == text
    assert abs(parse_reset(text) - ms) < 1


async def test_an_unlimited_token_costs_nothing() -> None:
    assert await limits.admit(token()) is None
    # Nothing was made: no state object, so no round trip could have been sent.
    assert state.current_state() is None


async def test_rpm_admits_its_limit_then_refuses_with_retry_after_and_headers() -> None:
    t = token(rpm=3)
    seen = []
    for _ in range(3):
        admission = await limits.admit(t)
        assert admission is not None
        seen.append(admission.headers)
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert {h["x-ratelimit-limit-requests"] for h in seen} == {"3"}
    # Each request moves the window on by 20 s: the bucket is full again 20, 40, 60 s on.
    resets = [parse_reset(h["x-ratelimit-reset-requests"]) for h in seen]
    for reset, expected in zip(resets, (20_000, 40_000, 60_000), strict=True):
        assert expected - 100 <= reset <= expected
    assert "x-ratelimit-limit-tokens" not in seen[0]
    with pytest.raises(ApiError) as refused:
        await limits.admit(t)
    error = refused.value
    assert error.status == 429
    assert error.code == "rate_limit_exceeded"
    body = json.loads(error.body(openai=True))
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert 19 <= int(error.headers["Retry-After"]) <= 20
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    # A refusal counts nothing: the next one waits just as long.
    with pytest.raises(ApiError) as again:
        await limits.admit(t)
    assert again.value.headers["Retry-After"] == error.headers["Retry-After"]


async def test_tpm_refuses_once_the_answers_reported_the_minutes_tokens() -> None:
    t = token(tpm=100)
    first = await limits.admit(t)
    assert first is not None
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    assert first.headers["x-ratelimit-reset-tokens"] == "0ms"
    # A request admitted under the limit finishes, whatever it costs.
    await limits.end(first, 150)
    with pytest.raises(ApiError) as refused:
        await limits.admit(t)
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert json.loads(refused.value.body(openai=True))["error"]["type"] == "tokens"
    # 150 tokens at 100 a minute: 90 s of window, the next token passes ~30.6 s from now.
    assert 30 <= int(refused.value.headers["Retry-After"]) <= 31


async def test_tpm_counts_only_what_was_reported() -> None:
    t = token(tpm=1000, rpm=100)
    admission = await limits.admit(t)
    assert admission is not None
    await limits.end(admission, 400)
    after = await limits.admit(t)
    assert after is not None
    assert 599 <= int(after.headers["x-ratelimit-remaining-tokens"]) <= 600
    await limits.end(after, None)  # no usage reported: nothing charged
    last = await limits.admit(t)
    assert last is not None
    assert 599 <= int(last.headers["x-ratelimit-remaining-tokens"]) <= 600


async def test_max_concurrency_refuses_at_once_and_admits_when_one_ends(hub: object) -> None:
    t = token(max_concurrency=2)
    one, two = await limits.admit(t), await limits.admit(t)
    assert one is not None
    assert two is not None
    assert one.member != two.member
    # No rpm: the requests headers tell the places in flight.
    assert one.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "0s",
    }
    assert two.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(ApiError) as refused:
        await limits.admit(t)
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "1"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    await limits.end(one, None)
    three = await limits.admit(t)
    assert three is not None
    with pytest.raises(ApiError):
        await limits.admit(t)


async def test_a_dead_workers_requests_in_flight_stop_counting(hub: object) -> None:
    if not settings.REDIS_URL:
        pytest.skip("one process: its requests cannot outlive it")
    t = token(max_concurrency=1)
    shared = state.get_state()
    # A request a worker that died admitted: its member names a channel with no liveness key.
    assert shared.conn is not None
    await shared.conn.client().zadd(shared.conn.key("lc", t.pk), {"dead.channel!x 1": 1})
    admission = await limits.admit(t)
    assert admission is not None
    members = await shared.conn.client().zrange(shared.conn.key("lc", t.pk), 0, -1)
    assert members == [admission.member]
    ttl = await shared.conn.client().pttl(shared.conn.key("lc", t.pk))
    assert 0 < ttl <= state.TASK_TTL_SECONDS * 1000


async def test_limits_of_one_token_leave_anothers_alone() -> None:
    a, b = token(rpm=1), token(rpm=1)
    assert await limits.admit(a) is not None
    with pytest.raises(ApiError):
        await limits.admit(a)
    assert await limits.admit(b) is not None

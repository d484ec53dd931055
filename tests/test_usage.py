"""Usage records (virtual_llms/usage.py): token counts read from answers, the usage chunk the
broker asks a streaming publisher for and takes out again, records buffered and written in
batches, the usage API and command, and gcsweep's pruning. In process, on the real views,
hub and state (the in-memory ones on the suite's first run, Redis on its second)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from io import StringIO
from types import SimpleNamespace
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.test import AsyncClient, Client, override_settings
from django.utils import timezone

from tests.conftest import Tokens
from virtual_llms import answers, binding, usage
from virtual_llms import hub as hub_mod
from virtual_llms.auth import token_create
from virtual_llms.models import ApiToken, UsageRecord

# --- reading usage from answers -------------------------------------------------------------


def test_a_streamed_chat_or_completion_is_asked_for_its_usage_once() -> None:
    body: dict[str, Any] = {"model": "m", "stream": True}
    assert usage.ask_for_usage(body, "/v1/chat/completions")
    assert body["stream_options"] == {"include_usage": True}
    kept: dict[str, Any] = {"stream_options": {"include_usage": False, "x": 1}}
    assert usage.ask_for_usage(kept, "/v1/completions")
    assert kept["stream_options"] == {"include_usage": True, "x": 1}
    asked: dict[str, Any] = {"stream_options": {"include_usage": True}}
    assert not usage.ask_for_usage(asked, "/v1/chat/completions")
    assert asked == {"stream_options": {"include_usage": True}}
    for other in ("/v1/responses", "/v1/embeddings"):
        untouched: dict[str, Any] = {"model": "m"}
        assert not usage.ask_for_usage(untouched, other)
        assert untouched == {"model": "m"}


def outcome() -> Any:
    return SimpleNamespace(prompt_tokens=None, completion_tokens=None)


USAGE_CHUNK = json.dumps(
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
)


def test_the_usage_chunk_the_broker_added_is_taken_out_and_counted() -> None:
    out = outcome()
    assert usage.relayed_chunk(out, USAGE_CHUNK, added=True) is None
    assert (out.prompt_tokens, out.completion_tokens) == (7, 3)
    # The "usage": null an upstream puts in every other chunk goes too.
    content = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    relayed = usage.relayed_chunk(out, json.dumps(content), added=True)
    assert relayed is not None
    assert json.loads(relayed) == {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}


def test_a_usage_chunk_the_client_asked_for_is_kept_and_counted() -> None:
    out = outcome()
    assert usage.relayed_chunk(out, USAGE_CHUNK, added=False) == USAGE_CHUNK
    assert (out.prompt_tokens, out.completion_tokens) == (7, 3)
    plain = '{"choices": [{"delta": {"content": "usage"}}]}'  # the word, not the field
    assert usage.relayed_chunk(out, plain, added=True) == plain
    assert usage.relayed_chunk(out, 'not json, with "usage"', added=True) is not None


def test_usage_of_whole_answers() -> None:
    out = outcome()
    usage.note_body(out, b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}}')
    assert (out.prompt_tokens, out.completion_tokens) == (5, 2)
    responses = outcome()
    usage.note_body(responses, {"usage": {"input_tokens": 4, "output_tokens": 9}})
    assert (responses.prompt_tokens, responses.completion_tokens) == (4, 9)
    # A long answer: its usage is read from its end, even with the word in its content.
    text = "x" * 100_000 + '{"usage": {"prompt_tokens": 99}}'
    long = json.dumps(
        {
            "choices": [{"message": {"content": text}}],
            "usage": {"prompt_tokens": 6, "completion_tokens": 1},
        }
    ).encode()
    big = outcome()
    usage.note_body(big, long)
    assert (big.prompt_tokens, big.completion_tokens) == (6, 1)
    inside = outcome()
    usage.note_body(inside, json.dumps({"choices": [{"text": text}]}).encode())
    assert (inside.prompt_tokens, inside.completion_tokens) == (None, None)
    none = outcome()
    for body in (b'{"choices": []}', b"{oops", {"usage": {"prompt_tokens": -1}}, [1]):
        usage.note_body(none, body)
    assert (none.prompt_tokens, none.completion_tokens) == (None, None)


def test_usage_of_a_stream_passed_through_as_bytes() -> None:
    out = outcome()
    seen = usage.StreamUsage(out)
    stream = (
        f"data: {chunk('hi')}\n\n"
        f"data: {chunk(None, usage={'prompt_tokens': 21, 'completion_tokens': 2})}\n\n"
        "data: [DONE]\n\n"
    ).encode()
    cut = stream.index(b"prompt_tokens")  # the usage line arrives in two reads
    for piece in (stream[:10], stream[10:cut], stream[cut:]):
        seen.feed(piece)
    assert (out.prompt_tokens, out.completion_tokens) == (21, 2)
    quiet = outcome()
    usage.StreamUsage(quiet).feed(f"data: {chunk('usage')}\n\n".encode())
    assert quiet.prompt_tokens is None


# --- reading records back --------------------------------------------------------------------


def add(token: ApiToken | None, model: str, when: datetime, status: int = 200, **kw: Any) -> None:
    UsageRecord.objects.create(
        token=token,
        llm_name=model,
        endpoint="/v1/chat/completions",
        status=status,
        duration_ms=5.0,
        created_at=when,
        **kw,
    )


@pytest.fixture
def records(tokens: Tokens) -> datetime:
    now = timezone.now()
    add(tokens.client, "a", now - timedelta(hours=1), prompt_tokens=10, completion_tokens=5)
    add(tokens.client, "b", now - timedelta(hours=2), prompt_tokens=1, completion_tokens=1)
    add(tokens.client, "a", now - timedelta(hours=3), status=503)
    add(tokens.admin, "a", now - timedelta(hours=4), prompt_tokens=100, completion_tokens=50)
    add(tokens.client, "a", now - timedelta(days=3), prompt_tokens=1000, completion_tokens=1)
    return now


def get(client: Client, url: str, token: str) -> Any:
    return client.get(url, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.django_db
def test_usage_api_sums_per_token_model_and_day(
    client: Client, tokens: Tokens, records: datetime
) -> None:
    response = get(client, "/api/v1/usage", tokens.admin_plain)
    assert response.status_code == 200
    body = response.json()
    assert body["groupBy"] == "token"
    since = datetime.fromisoformat(body["since"])
    until = datetime.fromisoformat(body["until"])
    assert timedelta(hours=23, minutes=59) < until - since <= timedelta(hours=24)
    assert body["rows"] == [
        {"key": "cli", "requests": 3, "errors": 1, "promptTokens": 11, "completionTokens": 6},
        {"key": "adm", "requests": 1, "errors": 0, "promptTokens": 100, "completionTokens": 50},
    ]
    by_model = get(client, "/api/v1/usage?groupBy=model", tokens.admin_plain).json()["rows"]
    assert [(r["key"], r["requests"], r["promptTokens"]) for r in by_model] == [
        ("a", 3, 110),
        ("b", 1, 1),
    ]
    week = (records - timedelta(days=7)).isoformat()
    by_day = get(
        client, f"/api/v1/usage?groupBy=day&since={week.replace('+', '%2B')}", tokens.admin_plain
    ).json()
    days = {r["key"]: r["requests"] for r in by_day["rows"]}
    assert sum(days.values()) == 5
    assert (records - timedelta(days=3)).astimezone(UTC).strftime("%Y-%m-%d") in days
    assert list(days) == sorted(days)
    window = get(
        client,
        "/api/v1/usage?since=2000-01-01&until=2000-01-02T00:00:00Z",
        tokens.admin_plain,
    ).json()
    assert window["rows"] == []
    assert window["since"] == "2000-01-01T00:00:00+00:00"


@pytest.mark.django_db
def test_usage_me_is_the_callers_own_token_only(
    client: Client, tokens: Tokens, records: datetime
) -> None:
    body = get(client, "/api/v1/usage/me", tokens.client_plain).json()
    assert body["rows"] == [
        {"key": "cli", "requests": 3, "errors": 1, "promptTokens": 11, "completionTokens": 6}
    ]
    _, fresh = token_create(role="client", label="new")
    assert get(client, "/api/v1/usage/me", fresh).json()["rows"] == [
        {"key": "new", "requests": 0, "errors": 0, "promptTokens": 0, "completionTokens": 0}
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query", ["since=yesterday", "until=2024-13-45", "groupBy=user", "since=2030-01-01"]
)
def test_bad_usage_queries_are_400(client: Client, tokens: Tokens, query: str) -> None:
    response = get(client, f"/api/v1/usage?{query}", tokens.admin_plain)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.django_db
def test_usage_is_the_admins_and_usage_me_needs_a_client(client: Client, tokens: Tokens) -> None:
    assert get(client, "/api/v1/usage", tokens.client_plain).status_code == 403
    assert client.get("/api/v1/usage").status_code == 401
    assert get(client, "/api/v1/usage/me", tokens.publisher_plain).status_code == 403


@pytest.mark.django_db
def test_usage_command_prints_the_table(tokens: Tokens, records: datetime) -> None:
    out = StringIO()
    call_command("usage", "--since", "7d", "--by", "token", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Usage by token, ")
    assert lines[1].split() == ["token", "requests", "errors", "prompt", "completion"]
    assert lines[2].split() == ["cli", "4", "1", "1011", "7"]
    assert lines[3].split() == ["adm", "1", "0", "100", "50"]
    assert lines[-1].split() == ["total", "5", "1", "1111", "57"]
    model = StringIO()
    call_command("usage", "--since", "2h", "--by", "model", stdout=model)
    assert model.getvalue().splitlines()[2].split() == ["a", "1", "0", "10", "5"]


@pytest.mark.django_db
def test_gcsweep_prunes_usage_past_the_retention(tokens: Tokens) -> None:
    now = timezone.now()
    add(tokens.client, "a", now - timedelta(days=91))
    add(tokens.client, "a", now - timedelta(days=89))
    out, err = StringIO(), StringIO()
    call_command("gcsweep", stdout=out, stderr=err)
    assert out.getvalue().strip() == "markedInactive=0 deleted=0"
    assert "usagePruned=1" in err.getvalue()
    assert UsageRecord.objects.count() == 1
    with override_settings(MCPD_USAGE_RETENTION_DAYS=30):
        assert usage.prune() == 1
    assert not UsageRecord.objects.exists()


# --- records of real calls, in process ---------------------------------------------------------


@pytest.fixture
async def stream(tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub) -> hub_mod.ControlStream:
    control = hub_mod.ControlStream("sess", tokens.publisher.pk)
    await binding.stream_open(control)
    return control


async def chat(token: str, body: dict[str, Any]) -> Any:
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


async def task_frame(control: hub_mod.ControlStream) -> dict[str, Any]:
    frame = await asyncio.wait_for(control.queue.get(), 5)
    assert frame is not None
    return dict(frame)


def chunk(content: str | None, **extra: Any) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": choices, **extra})


async def records_now() -> list[UsageRecord]:
    await usage.flush()
    return await sync_to_async(lambda: list(UsageRecord.objects.order_by("id")))()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("asked", [False, True])
async def test_a_streamed_call_is_recorded_with_its_usage(
    tokens: Tokens, stream: hub_mod.ControlStream, asked: bool
) -> None:
    body: dict[str, Any] = {"model": "m1", "stream": True, "messages": []}
    if asked:
        body["stream_options"] = {"include_usage": True}
    request = asyncio.create_task(chat(tokens.client_plain, body))
    frame = await task_frame(stream)
    assert frame["body"]["stream_options"] == {"include_usage": True}
    final = chunk(None, usage={"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16})
    await answers.post_chunks(
        token_id=tokens.publisher.pk,
        task_id=frame["taskId"],
        chunks=[
            {"data": chunk("hi", usage=None), "done": False},
            {"data": final, "done": False},
            {"data": "[DONE]", "done": True},
        ],
    )
    response = await asyncio.wait_for(request, 10)
    text = b"".join([part async for part in response.streaming_content]).decode()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    if asked:
        assert events[:-1] == [chunk("hi", usage=None), final]
    else:  # exactly the stream it asked for: no usage chunk, no "usage": null
        assert [json.loads(e) for e in events[:-1]] == [json.loads(chunk("hi"))]
    (record,) = await records_now()
    assert record.token_id == tokens.client.pk
    assert record.llm_name == "m1"
    assert record.endpoint == "/v1/chat/completions"
    assert record.status == 200
    assert record.streamed
    assert (record.prompt_tokens, record.completion_tokens) == (12, 4)
    assert record.ttfb_ms is not None
    assert 0 < record.ttfb_ms <= record.duration_ms


@pytest.mark.django_db(transaction=True)
async def test_unary_calls_and_refusals_are_recorded(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(chat(tokens.client_plain, {"model": "m1", "messages": []}))
    frame = await task_frame(stream)
    answer = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 8}}
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer
    )
    assert (await asyncio.wait_for(request, 10)).status_code == 200
    assert (await chat(tokens.client_plain, {"model": "nope"})).status_code == 404
    assert (await chat("mcpd_nobody_x", {"model": "m1"})).status_code == 401
    ok, missing = await records_now()
    assert (ok.status, ok.prompt_tokens, ok.completion_tokens, ok.streamed) == (200, 3, 8, False)
    assert (missing.status, missing.code, missing.llm_name) == (404, "model_not_found", "")
    assert missing.prompt_tokens is None


@pytest.mark.django_db(transaction=True)
async def test_a_limited_token_gets_headers_and_429_in_process(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    limited, plain = await sync_to_async(token_create)(role="client", label="lim", rpm=2, tpm=50)
    seen = []
    for _ in range(2):
        request = asyncio.create_task(chat(plain, {"model": "m1", "messages": []}))
        frame = await task_frame(stream)
        answer = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 10}}
        await answers.post_result(
            token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer
        )
        seen.append(await asyncio.wait_for(request, 10))
    assert [r["x-ratelimit-remaining-requests"] for r in seen] == ["1", "0"]
    # The first answer's 20 tokens were charged when it ended.
    assert [r["x-ratelimit-remaining-tokens"] for r in seen] in (["50", "30"], ["50", "29"])
    assert {r["x-ratelimit-limit-tokens"] for r in seen} == {"50"}
    refused = await chat(plain, {"model": "m1", "messages": []})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused["Retry-After"]) >= 1
    assert refused["x-ratelimit-remaining-requests"] == "0"
    # An unlimited token gets none of it.
    free = await chat(tokens.client_plain, {"model": "nope"})
    assert not [h for h in free.headers if h.lower().startswith("x-ratelimit")]
    assert limited.pk


def test_a_period_at_the_edge_of_the_calendar_is_answered_not_a_500(db: None) -> None:
    """Found by tests/test_schemathesis.py: an until within a day of year 1 made the
    default since overflow (500)."""
    from django.test import Client

    from virtual_llms.auth import token_create

    _, admin = token_create(role="admin", label="ops")
    for query in ("until=0001-01-01T00:06:14Z", "since=2860-06-14T08:19:00Z&until=0001-01-01"):
        response = Client().get(
            f"/api/v1/usage/me?{query}", headers={"Authorization": f"Bearer {admin}"}
        )
        assert response.status_code in (200, 400), response.content
        assert "error" in response.json() or "rows" in response.json()

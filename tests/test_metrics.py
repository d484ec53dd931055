"""/metrics and the request log, in process (Django's async test client against the real
views, hub and state): each series moves with the calls, streams and wakes that should move
it, the broker's gauges read the shared state, and the log lines say what happened without
a body or a secret. The second run of the suite does the same on Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient, override_settings
from prometheus_client.parser import text_string_to_metric_families
from pythonjsonlogger.json import JsonFormatter

from tests.conftest import Tokens
from virtual_llms import answers, binding, metrics, rowcache, services
from virtual_llms import hub as hub_mod
from virtual_llms.inference import Outcome
from virtual_llms.models import Backend, Llm

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("async_orm")]

CHAT = "/v1/chat/completions"


def answer(prompt_tokens: int = 7, completion_tokens: int = 5) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


@pytest.fixture
async def stream(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> AsyncIterator[hub_mod.ControlStream]:
    """The publisher's control stream for session "sess", serving LLM "m1"."""
    control = hub_mod.ControlStream("sess", tokens.publisher.pk)
    await binding.stream_open(control)
    yield control
    await binding.stream_close(control)


async def scrape(token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await AsyncClient().get("/metrics", headers=headers)


async def series(tokens: Tokens) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one scrape, by name and labels."""
    response = await scrape(tokens.admin_plain)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def call(tokens: Tokens, body: dict[str, Any], endpoint: str = CHAT) -> Any:
    return await AsyncClient().post(
        endpoint,
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {tokens.client_plain}"},
    )


async def task_frame(control: hub_mod.ControlStream) -> dict[str, Any]:
    frame = await asyncio.wait_for(control.queue.get(), 5)
    assert frame is not None
    return dict(frame)


SECRET_PROMPT = "the launch codes are 0000"
REQUEST = {"model": "m1", "messages": [{"role": "user", "content": SECRET_PROMPT}]}


# --- who may scrape ---------------------------------------------------------------------------


async def test_metrics_needs_an_admin_token(tokens: Tokens) -> None:
    anonymous = await scrape(None)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    client = await scrape(tokens.client_plain)
    assert client.status_code == 403
    assert client.json()["error"]["code"] == "forbidden"
    assert set(client.json()["error"]) == {"code", "message"}  # the /api/ shape
    assert (await scrape(tokens.admin_plain)).status_code == 200


async def test_metrics_is_open_to_anyone_with_metrics_public(tokens: Tokens) -> None:
    with override_settings(MCPD_METRICS_PUBLIC=True):
        response = await scrape(None)
    assert response.status_code == 200
    assert b"mcpd_fleet_read_ok 1.0" in response.content


async def test_metrics_answers_openmetrics_when_asked(tokens: Tokens) -> None:
    response = await AsyncClient().get(
        "/metrics",
        headers={
            "Authorization": f"Bearer {tokens.admin_plain}",
            "Accept": "application/openmetrics-text; version=1.0.0",
        },
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.endswith(b"# EOF\n")


# --- per-worker series ------------------------------------------------------------------------


async def test_a_relayed_call_moves_its_counters_and_histograms(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    before = await series(tokens)
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    assert await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer(7, 5)
    )
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200
    after = await series(tokens)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mcpd_requests_total", model="m1", endpoint=CHAT, code="200") == 1
    assert moved("mcpd_request_duration_seconds_count", model="m1", endpoint=CHAT) == 1
    assert moved("mcpd_request_duration_seconds_sum", model="m1", endpoint=CHAT) > 0
    assert moved("mcpd_time_to_first_token_seconds_count", model="m1") == 1
    assert moved("mcpd_broker_overhead_seconds_count", endpoint=CHAT) == 1
    assert moved("mcpd_tokens_total", model="m1", kind="prompt") == 7
    assert moved("mcpd_tokens_total", model="m1", kind="completion") == 5
    assert moved("mcpd_queue_wait_seconds_count", model="m1") == 0  # it did not wait
    assert value(after, "mcpd_control_streams", transport="sse") >= 1


async def test_a_streamed_call_counts_its_usage_chunk_and_first_token(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    before = await series(tokens)
    request = asyncio.create_task(call(tokens, {**REQUEST, "stream": True}))
    frame = await task_frame(stream)
    usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
    assert await answers.post_chunks(
        token_id=tokens.publisher.pk,
        task_id=frame["taskId"],
        chunks=[
            {"data": json.dumps({"choices": [{"delta": {"content": "a"}}]}), "done": False},
            {"data": json.dumps(usage), "done": False},
            {"data": "[DONE]", "done": True},
        ],
    )
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200
    b"".join([chunk async for chunk in response.streaming_content])
    after = await series(tokens)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mcpd_requests_total", model="m1", endpoint=CHAT, code="200") == 1
    assert moved("mcpd_time_to_first_token_seconds_count", model="m1") == 1
    assert moved("mcpd_tokens_total", model="m1", kind="prompt") == 11
    assert moved("mcpd_tokens_total", model="m1", kind="completion") == 3


async def test_an_unknown_model_is_counted_without_its_name(tokens: Tokens) -> None:
    before = await series(tokens)
    response = await call(tokens, {**REQUEST, "model": "no-such-model"})
    assert response.status_code == 404
    after = await series(tokens)
    assert (
        value(after, "mcpd_requests_total", model="", endpoint=CHAT, code="404")
        - value(before, "mcpd_requests_total", model="", endpoint=CHAT, code="404")
        == 1
    )
    assert not any(dict(labels).get("model") == "no-such-model" for _, labels in after)


async def test_a_timed_out_task_is_a_cancellation(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    before = await series(tokens)
    with override_settings(MCPD_INFER_TIMEOUT_SECONDS=0.3):
        response = await call(tokens, REQUEST)
    assert response.status_code == 504
    frame = await task_frame(stream)
    assert (await task_frame(stream)) == {"kind": "cancel", "taskId": frame["taskId"]}
    after = await series(tokens)
    key = {"model": "m1", "reason": "timeout"}
    assert (
        value(after, "mcpd_cancellations_total", **key)
        - value(before, "mcpd_cancellations_total", **key)
        == 1
    )
    assert value(after, "mcpd_requests_total", model="m1", endpoint=CHAT, code="504") >= 1


async def test_a_wake_is_counted_once_with_its_duration(
    tokens: Tokens, stream: hub_mod.ControlStream, caplog: pytest.LogCaptureFixture
) -> None:
    await sync_to_async(Llm.objects.filter(name="m1").update)(status="hibernating")
    before = await series(tokens)
    caplog.set_level(logging.INFO, logger="mcpd.wake")
    request = asyncio.create_task(call(tokens, REQUEST))
    wake = await task_frame(stream)
    assert wake["kind"] == "wake"
    assert await answers.post_result(
        token_id=tokens.publisher.pk, task_id=wake["taskId"], status=200, body={"ok": True}
    )
    infer = await task_frame(stream)
    assert await answers.post_result(
        token_id=tokens.publisher.pk, task_id=infer["taskId"], status=200, body=answer()
    )
    assert (await asyncio.wait_for(request, 10)).status_code == 200
    after = await series(tokens)
    assert (
        value(after, "mcpd_wakes_total", model="m1", outcome="ok")
        - value(before, "mcpd_wakes_total", model="m1", outcome="ok")
        == 1
    )
    assert (
        value(after, "mcpd_wake_duration_seconds_count", model="m1")
        - value(before, "mcpd_wake_duration_seconds_count", model="m1")
        == 1
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "mcpd.wake"]
    assert any(
        line.startswith("event=wake model=m1 session=sess outcome=ok code=- ms=") for line in lines
    ), lines


async def test_a_queued_call_records_its_wait_and_the_queue_depth(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    """A backend with one slot: the second call waits in the queue until the first ends."""
    await sync_to_async(Backend.objects.filter(llm__name="m1").update)(max_concurrency=1)
    rowcache.reset()  # an update() sends no signal: this process reads the row again
    before = await series(tokens)
    first = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    second = asyncio.create_task(call(tokens, REQUEST))
    for _ in range(100):
        found = await series(tokens)
        if value(found, "mcpd_queue_depth", model="m1") == 1:
            break
        await asyncio.sleep(0.02)
    assert value(found, "mcpd_queue_depth", model="m1") == 1
    assert value(found, "mcpd_inflight_requests", model="m1") == 1
    assert value(found, "mcpd_slots", model="m1") == 1
    await asyncio.sleep(0.1)  # a wait long enough to see
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer()
    )
    queued = await task_frame(stream)
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=queued["taskId"], status=200, body=answer()
    )
    assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
    after = await series(tokens)
    assert (
        value(after, "mcpd_queue_wait_seconds_count", model="m1")
        - value(before, "mcpd_queue_wait_seconds_count", model="m1")
        == 1
    )
    assert (
        value(after, "mcpd_queue_wait_seconds_sum", model="m1")
        - value(before, "mcpd_queue_wait_seconds_sum", model="m1")
        >= 0.1
    )
    assert value(after, "mcpd_queue_depth", model="m1") == 0


async def test_failovers_are_counted_per_model(tokens: Tokens, virtual_llm: None) -> None:
    """The Outcome of a call that failed over twice (a real one: test_multiproc_metrics)."""
    before = await series(tokens)
    metrics.record(
        Outcome(endpoint=CHAT, started=0.0, model="m1", status=200, failovers=2, total_s=0.1)
    )
    after = await series(tokens)
    assert (
        value(after, "mcpd_failovers_total", model="m1")
        - value(before, "mcpd_failovers_total", model="m1")
        == 2
    )


# --- broker-wide gauges ---------------------------------------------------------------------


async def test_gauges_follow_the_stream_and_the_tasks_in_flight(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    found = await series(tokens)
    assert value(found, "mcpd_backends", model="m1", status="disconnected") == 1
    assert value(found, "mcpd_backends", model="m1", status="active") == 0
    assert value(found, "mcpd_slots", model="m1") == 0
    control = hub_mod.ControlStream("sess", tokens.publisher.pk)
    await binding.stream_open(control)
    try:
        request = asyncio.create_task(call(tokens, REQUEST))
        frame = await task_frame(control)
        found = await series(tokens)
        assert value(found, "mcpd_backends", model="m1", status="active") == 1
        assert value(found, "mcpd_backends", model="m1", status="disconnected") == 0
        assert value(found, "mcpd_inflight_requests", model="m1") == 1
        assert value(found, "mcpd_queue_depth", model="m1") == 0
        assert value(found, "mcpd_slots", model="m1") == float("inf")  # no limit
        await answers.post_result(
            token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer()
        )
        await asyncio.wait_for(request, 10)
        assert value(await series(tokens), "mcpd_inflight_requests", model="m1") == 0
    finally:
        await binding.stream_close(control)


async def test_a_name_no_longer_registered_loses_its_series(
    tokens: Tokens, stream: hub_mod.ControlStream
) -> None:
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer()
    )
    await asyncio.wait_for(request, 10)
    assert value(await series(tokens), "mcpd_requests_total", model="m1", endpoint=CHAT, code="200")
    await sync_to_async(Llm.objects.filter(name="m1").delete)()
    after = await series(tokens)
    assert not any(dict(labels).get("model") == "m1" for _, labels in after)


async def test_control_streams_count_what_this_worker_holds(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    before = value(await series(tokens), "mcpd_control_streams", transport="ws")
    control = hub_mod.ControlStream("sess", tokens.publisher.pk, "ws")
    await binding.stream_open(control)
    assert value(await series(tokens), "mcpd_control_streams", transport="ws") == before + 1
    await binding.stream_close(control)
    assert value(await series(tokens), "mcpd_control_streams", transport="ws") == before


# --- the request log --------------------------------------------------------------------------


async def test_one_line_per_call_with_no_body_or_secret(
    tokens: Tokens, stream: hub_mod.ControlStream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpd.request")
    request = asyncio.create_task(call(tokens, REQUEST))
    frame = await task_frame(stream)
    await answers.post_result(
        token_id=tokens.publisher.pk, task_id=frame["taskId"], status=200, body=answer(7, 5)
    )
    assert (await asyncio.wait_for(request, 10)).status_code == 200
    records = [r for r in caplog.records if r.name == "mcpd.request"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert records[0].levelno == logging.INFO
    assert line.startswith(f"model=m1 endpoint={CHAT} status=200 code=- stream=0 ms=")
    for field in ("ttfb_ms=", "queue_ms=0.0", "wake_ms=0.0", "token=cli", "worker="):
        assert field in line, line
    assert f"task={frame['taskId']}" in line
    assert "prompt_tokens=7 completion_tokens=5" in line
    everything = caplog.text
    assert SECRET_PROMPT not in everything
    assert tokens.client_plain not in everything
    assert tokens.publisher_plain not in everything


async def test_the_json_format_puts_the_fields_in_the_object(
    tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpd.request")
    with override_settings(MCPD_LOG_FORMAT="json"):
        assert (await call(tokens, {**REQUEST, "model": "nope"})).status_code == 404
    (record,) = [r for r in caplog.records if r.name == "mcpd.request"]
    formatters = cast(dict[str, dict[str, Any]], settings.LOGGING["formatters"])
    config = {k: v for k, v in formatters["json"].items() if k != "()"}
    line = JsonFormatter(**config).format(record)
    parsed = json.loads(line)
    assert parsed["logger"] == "mcpd.request"
    assert parsed["level"] == "INFO"
    assert parsed["status"] == 404
    assert parsed["code"] == "model_not_found"
    assert parsed["model"] is None
    assert parsed["token"] == "cli"
    assert "\n" not in line


async def test_stream_open_and_close_have_a_line_each(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpd.stream")
    control = hub_mod.ControlStream("sess", tokens.publisher.pk)
    await binding.stream_open(control)
    await binding.stream_close(control)
    lines = [r.getMessage() for r in caplog.records if r.name == "mcpd.stream"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"event=stream_open session=sess transport=sse epoch={control.epoch}"
    )
    assert lines[1].startswith(
        f"event=stream_close session=sess transport=sse epoch={control.epoch}"
    )
    assert " why=end " in lines[1]


# --- units ------------------------------------------------------------------------------------


def test_cancel_reasons_are_bounded() -> None:
    out = Outcome(endpoint=CHAT, started=0.0, client_left=True)
    assert metrics._cancel_reason(out) == "client_left"
    out = Outcome(endpoint=CHAT, started=0.0, code="timeout")
    assert metrics._cancel_reason(out) == "timeout"
    out = Outcome(endpoint=CHAT, started=0.0, code="publisher_protocol_error")
    assert metrics._cancel_reason(out) == "error"


async def test_the_grafana_dashboard_uses_only_series_the_broker_exposes(tokens: Tokens) -> None:
    dashboard = (settings.BASE_DIR / "docs" / "grafana-mcpd.json").read_text()
    exprs = [
        target["expr"]
        for panel in json.loads(dashboard)["panels"]
        for target in panel.get("targets", [])
    ]
    used = {name for expr in exprs for name in re.findall(r"\b(?:mcpd|process)_\w+", expr)}
    response = await scrape(tokens.admin_plain)
    typed = dict(
        line.split(" ")[2:4]
        for line in response.content.decode().splitlines()
        if line.startswith("# TYPE ")
    )
    for name in used:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or typed.get(base) == "histogram", name
    assert len(used) >= 15


class UsageUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream of a public row that reports usage."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps(answer(21, 8)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_a_public_rows_answer_is_counted_too(tokens: Tokens, async_orm: None) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), UsageUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        await sync_to_async(services.llm_create_public)(
            name="pub-usage",
            type="openai",
            model="gpt-x",
            url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            api_key="sk-upstream-secret",
        )
        before = await series(tokens)
        response = await call(tokens, {**REQUEST, "model": "pub-usage"})
        assert response.status_code == 200
        after = await series(tokens)
    finally:
        server.shutdown()
        server.server_close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mcpd_requests_total", model="pub-usage", endpoint=CHAT, code="200") == 1
    assert moved("mcpd_time_to_first_token_seconds_count", model="pub-usage") == 1
    assert moved("mcpd_tokens_total", model="pub-usage", kind="prompt") == 21
    assert moved("mcpd_tokens_total", model="pub-usage", kind="completion") == 8


async def test_without_the_shared_state_the_workers_own_series_are_still_served(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.exceptions

    from virtual_llms import fleet_snapshot

    def away() -> None:
        raise redis.exceptions.ConnectionError("Redis is away")

    monkeypatch.setattr(fleet_snapshot, "read", away)
    found = await series(tokens)
    assert value(found, "mcpd_fleet_read_ok") == 0
    assert not any(name == "mcpd_backends" for name, _ in found)
    assert any(name == "process_cpu_seconds_total" for name, _ in found)

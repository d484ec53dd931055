"""Hostile input through the real ASGI application (issue 25 item 1, issue 29 items 2-3):
too-deep JSON, malformed ids and names, Django's own refusals (under DEBUG too), unknown
WebSocket paths, deep socket frames, publisher answers with impossible statuses, and chunk
data that tries to forge SSE framing. Each is a clear 4xx in the contract's shape that
changes nothing, and the server goes on serving."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import h11
import httpx
import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
)
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from django.test import RequestFactory, override_settings

from mcpd_site import asgi
from tests.cluster import Broker
from tests.conftest import Tokens
from virtual_llms import edge, inference, rowcache, sse, tasks
from virtual_llms import hub as hub_mod
from virtual_llms.models import Llm, ProviderSession, is_task_id

pytestmark = pytest.mark.django_db(transaction=True)

DEEP_ARRAY = b"[" * 2000 + b"1" + b"]" * 2000
DEEP_OBJECT = b'{"a":' * 2000 + b"1" + b"}" * 2000
JUST_TOO_DEEP = b'{"model":"m1","x":' + b"[" * 128 + b"]" * 128 + b"}"  # 129 levels
DEEPEST_TAKEN = b'{"model":"m1","x":' + b"[" * 127 + b"]" * 127 + b"}"  # 128 levels


@pytest.fixture
async def upkeep(async_orm: None) -> Any:
    """Stop this loop's upkeep task at the end (it runs for the life of a worker)."""
    yield
    task = asgi.ApiASGIHandler._upkeep.pop()
    if task is not None:
        task.cancel()


async def call(
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP request through the ASGI application, as daphne makes it."""
    sent = [(b"host", b"127.0.0.1"), *(headers or [])]
    if token is not None:
        sent.append((b"authorization", f"Bearer {token}".encode()))
    if body:
        sent.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query,
        "headers": sent,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    app = ApplicationCommunicator(asgi.application, scope)
    await app.send_input({"type": "http.request", "body": body})
    start = await app.receive_output(10)
    content = b""
    while True:
        part = await app.receive_output(10)
        content += part.get("body", b"")
        if not part.get("more_body"):
            break
    await app.wait(10)
    return start["status"], dict(start["headers"]), content


def api_error(got: tuple[int, dict[bytes, bytes], bytes], status: int) -> dict[str, Any]:
    """The /api/ shape: {"error": {"code", "message"}}."""
    code, headers, content = got
    assert code == status, content[:300]
    assert headers[b"Content-Type"] == b"application/json", content[:300]
    error = json.loads(content)["error"]
    assert set(error) == {"code", "message"}
    return dict(error)


def openai_error(got: tuple[int, dict[bytes, bytes], bytes], status: int) -> dict[str, Any]:
    """The /v1/ shape: {"error": {"message", "type", "code"}}."""
    code, headers, content = got
    assert code == status, content[:300]
    assert headers[b"Content-Type"] == b"application/json", content[:300]
    error = json.loads(content)["error"]
    assert {"message", "type", "code"} <= set(error)
    return dict(error)


def error_of(path: str, got: tuple[int, dict[bytes, bytes], bytes], status: int) -> dict[str, Any]:
    return openai_error(got, status) if path.startswith("/v1") else api_error(got, status)


def snapshot() -> tuple[list[tuple[Any, ...]], int]:
    rows = list(Llm.objects.order_by("name").values_list("name", "status", "version", "model"))
    return rows, ProviderSession.objects.count()


@pytest.fixture(params=[False, True], ids=["debug-off", "debug-on"])
def debug(request: pytest.FixtureRequest) -> Iterator[bool]:
    with override_settings(DEBUG=request.param):
        yield bool(request.param)


# --- JSON depth --------------------------------------------------------------------------

BODY_ROUTES = [
    ("/v1/chat/completions", "client"),
    ("/v1/completions", "client"),
    ("/v1/embeddings", "client"),
    ("/v1/responses", "client"),
    ("/api/v1/virtual/tasks/t1/result", "publisher"),
    ("/api/v1/virtual/tasks/t1/chunks", "publisher"),
    ("/api/v1/virtual/tasks/t1/error", "publisher"),
    ("/api/v1/virtual/register", "publisher"),
    ("/api/v1/virtual/heartbeat", "publisher"),
    ("/api/v1/virtual/status", "publisher"),
    ("/api/v1/llms", "admin"),
]


def token_of(tokens: Tokens, role: str) -> str:
    return {
        "client": tokens.client_plain,
        "publisher": tokens.publisher_plain,
        "admin": tokens.admin_plain,
    }[role]


@pytest.mark.parametrize(("path", "role"), BODY_ROUTES)
@pytest.mark.parametrize(
    "body", [DEEP_ARRAY, DEEP_OBJECT, JUST_TOO_DEEP], ids=["2000-array", "2000-object", "129"]
)
async def test_json_deeper_than_the_limit_is_400_invalid_json_everywhere(
    upkeep: None, virtual_llm: None, tokens: Tokens, debug: bool, path: str, role: str, body: bytes
) -> None:
    before = await sync_to_async(snapshot)()
    got = await call(
        "POST",
        path,
        token=token_of(tokens, role),
        body=body,
        headers=[(b"content-type", b"application/json")],
    )
    error = error_of(path, got, 400)
    assert error["code"] == "invalid_json"
    assert "nested deeper than 128 levels" in error["message"]
    assert await sync_to_async(snapshot)() == before
    # and the server goes on serving
    assert (await call("GET", "/v1/models", token=tokens.client_plain))[0] == 200


async def test_the_deepest_document_allowed_is_read(
    upkeep: None, virtual_llm: None, tokens: Tokens
) -> None:
    """128 levels are read: the request goes on to the row (whose publisher is offline)."""
    got = await call("POST", "/v1/chat/completions", token=tokens.client_plain, body=DEEPEST_TAKEN)
    assert openai_error(got, 503)["code"] == "publisher_offline"


# --- ids and names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "role", "code"),
    [
        ("/api/v1/virtual/sessions/\x00/stream", "publisher", "session_not_found"),
        ("/api/v1/virtual/sessions/-x/stream", "publisher", "session_not_found"),
        ("/api/v1/virtual/sessions/..%2f../stream", "publisher", "session_not_found"),
        ("/api/v1/llms/\x00", "client", "llm_not_found"),
        ("/api/v1/llms/a\x00b", "client", "llm_not_found"),
        ("/v1/models/\x00", "client", "model_not_found"),
        ("/api/v1/virtual/sessions//stream", "publisher", "not_found"),
        ("/api/v1/virtual/sessions/a/b/stream", "publisher", "not_found"),
    ],
)
async def test_a_malformed_id_or_name_in_a_path_is_a_json_404(
    upkeep: None, virtual_llm: None, tokens: Tokens, debug: bool, path: str, role: str, code: str
) -> None:
    got = await call("GET", path, token=token_of(tokens, role))
    assert error_of(path, got, 404)["code"] == code


@pytest.mark.parametrize("model", ["m\x00", "\x00", "../m1", "m1\n", "x" * 200])
async def test_a_model_name_that_cannot_exist_is_404_model_not_found(
    upkeep: None, virtual_llm: None, tokens: Tokens, model: str
) -> None:
    body = json.dumps({"model": model, "messages": []}).encode()
    got = await call("POST", "/v1/chat/completions", token=tokens.client_plain, body=body)
    assert openai_error(got, 404)["code"] == "model_not_found"


# --- Django's own refusals ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/nope", "/v1/nope", "/api", "/v1", "/api/v1/llms/"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_an_unknown_api_route_is_a_json_404_also_under_debug(
    upkeep: None, tokens: Tokens, debug: bool, path: str, method: str
) -> None:
    got = await call(method, path, token=tokens.client_plain)
    assert error_of(path, got, 404)["code"] == "not_found"


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/api/v1/virtual/register", "publisher"),
        ("/api/v1/virtual/heartbeat", "publisher"),
        ("/api/v1/llms", "admin"),
        ("/api/v1/virtual/tasks/t1/result", "publisher"),
        ("/v1/chat/completions", "client"),
    ],
)
async def test_a_body_over_djangos_limit_is_a_json_413_not_its_html_400(
    upkeep: None, virtual_llm: None, tokens: Tokens, debug: bool, path: str, role: str
) -> None:
    body = b'{"providerSessionId": "' + b"a" * 2048 + b'"}'
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024, MCPD_MAX_BODY_BYTES=1024):
        got = await call("POST", path, token=token_of(tokens, role), body=body)
    assert error_of(path, got, 413)["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "content_type", [b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded"]
)
async def test_a_form_body_is_read_as_json_and_refused_as_json(
    upkeep: None, tokens: Tokens, debug: bool, content_type: bytes
) -> None:
    got = await call(
        "POST",
        "/api/v1/virtual/register",
        token=tokens.publisher_plain,
        body=b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
        headers=[(b"content-type", content_type)],
    )
    assert api_error(got, 400)["code"] == "invalid_json"


async def test_a_body_is_json_whatever_its_content_type_and_any_accept_gets_json(
    upkeep: None, virtual_llm: None, tokens: Tokens
) -> None:
    body = b'{"providerSessionId": "sess"}'
    got = await call(
        "POST",
        "/api/v1/virtual/heartbeat",
        token=tokens.publisher_plain,
        body=body,
        headers=[(b"content-type", b"text/plain"), (b"accept", b"text/event-stream")],
    )
    assert got[0] == 200, got[2]
    assert json.loads(got[2]) == {"ok": True, "llms": 1}
    # A revoked (here: unknown) token that also accepts event streams gets its 401.
    got = await call(
        "POST",
        "/api/v1/virtual/register",
        token="mcpd_revoked_token",
        body=b"{}",
        headers=[(b"accept", b"text/event-stream")],
    )
    assert api_error(got, 401)["code"] == "unauthorized"


async def test_a_query_string_that_is_not_utf8_is_a_json_400(upkeep: None, tokens: Tokens) -> None:
    got = await call("GET", "/v1/models", token=tokens.client_plain, query=b"a=\xff")
    # Django reads it with replacement characters (a 200) or refuses it (a JSON 400): never
    # its HTML page.
    assert got[0] in (200, 400)
    assert got[1][b"Content-Type"] == b"application/json"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (SuspiciousOperation("odd"), 400, "invalid_request"),
        (DisallowedHost("evil.example"), 400, "invalid_request"),
        (TooManyFieldsSent("many"), 400, "invalid_request"),
        (MultiPartParserError("bad boundary"), 400, "invalid_request"),
        (BadRequest("bad"), 400, "invalid_request"),
        (RequestDataTooBig("big"), 413, "payload_too_large"),
        (PermissionDenied(), 403, "forbidden"),
        (Http404(), 404, "not_found"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
)
@pytest.mark.parametrize("prefix", ["/api/v1/x", "/v1/x"])
async def test_every_exception_a_view_lets_out_is_the_contracts_json(
    debug: bool, exc: Exception, status: int, code: str, prefix: str
) -> None:
    """The API handler's last word (edge.json_exceptions), where Django would render its
    handler pages, or under DEBUG its technical pages."""

    async def view(request: HttpRequest) -> HttpResponse:
        raise exc

    response = await edge.json_exceptions(view)(RequestFactory().get(prefix))
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    body = json.loads(response.content)["error"]
    assert body["code"] == code
    if prefix.startswith("/v1"):
        assert "type" in body


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        (edge.bad_request, 400),
        (edge.permission_denied, 403),
        (edge.not_found, 404),
        (edge.csrf_failure, 403),
    ],
)
def test_djangos_handlers_answer_json_on_the_api_and_html_elsewhere(
    handler: Any, status: int
) -> None:
    for path, json_expected in (("/api/v1/llms", True), ("/v1/models", True), ("/admin/", False)):
        response = handler(RequestFactory().get(path), Exception("x"))
        assert response.status_code == status
        assert (response["Content-Type"] == "application/json") is json_expected
    response = edge.server_error(RequestFactory().get("/api/v1/llms"))
    assert isinstance(response, HttpResponse)
    assert response.status_code == 500
    assert json.loads(response.content)["error"]["code"] == "internal_error"


async def test_the_admin_keeps_djangos_html_pages(upkeep: None, debug: bool) -> None:
    status, headers, _ = await call("GET", "/admin/login/", headers=[(b"host", b"evil.example")])
    assert status == 400
    assert headers[b"Content-Type"].startswith(b"text/html")


# --- the control socket --------------------------------------------------------------------


def ws(path: str, token: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        asgi.application, path, headers=[(b"authorization", f"Bearer {token}".encode())]
    )


async def receive(sock: WebsocketCommunicator) -> dict[str, Any]:
    return dict(json.loads(await sock.receive_from(timeout=5)))


@pytest.mark.parametrize(
    ("session", "code"),
    [
        ("", "not_found"),
        ("../..", "not_found"),
        ("a/b", "not_found"),
        ("x?token=y", "not_found"),  # the path ends at "?": .../sessions/x
        ("\x00", "session_not_found"),
        ("-x", "session_not_found"),
    ],
)
async def test_a_handshake_for_a_malformed_session_id_is_refused_with_4404(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, session: str, code: str
) -> None:
    sock = ws(f"/api/v1/virtual/sessions/{session}/ws", tokens.publisher_plain)
    connected, _ = await sock.connect()
    assert connected
    error = await receive(sock)
    assert error["type"] == "error"
    assert error["error"]["code"] == code
    assert (await sock.receive_output(timeout=5))["code"] == 4404


async def test_any_other_websocket_path_is_refused_with_4404(
    tokens: Tokens, hub: hub_mod.Hub
) -> None:
    sock = ws("/nowhere", tokens.publisher_plain)
    await sock.connect()
    assert (await receive(sock))["error"]["code"] == "not_found"
    assert (await sock.receive_output(timeout=5))["code"] == 4404


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 1100 + "1" + "]" * 1100,
        '{"type": "heartbeat", "x": ' + "[" * 200 + "]" * 200 + "}",
        '{"a":' * 3000 + "1" + "}" * 3000,
    ],
    ids=["1100-array", "200-in-a-frame", "3000-object"],
)
async def test_a_deeply_nested_frame_gets_protocol_error_and_the_socket_stays(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, frame: str
) -> None:
    sock = ws("/api/v1/virtual/sessions/sess/ws", tokens.publisher_plain)
    await sock.connect()
    assert (await receive(sock))["type"] == "ready"
    await sock.send_to(text_data=frame)
    refused = await receive(sock)
    assert refused["type"] == "protocol_error"
    assert refused["code"] == "invalid_json"
    # The socket and its session live on.
    await sock.send_to(text_data=json.dumps({"type": "heartbeat"}))
    assert await receive(sock) == {"type": "heartbeat", "ok": True, "llms": 1}
    assert await sync_to_async(lambda: Llm.objects.get(name="m1").status)() == "active"
    await sock.disconnect()


# --- publisher answers ---------------------------------------------------------------------


async def bound(tokens: Tokens) -> tuple[WebsocketCommunicator, hub_mod.Pending]:
    """A publisher socket bound to m1's session, and a task of m1 it has read."""
    sock = ws("/api/v1/virtual/sessions/sess/ws", tokens.publisher_plain)
    await sock.connect()
    await receive(sock)  # ready
    pending, _ = await inference.enqueue_infer(
        await rowcache.load_virtual("m1"), {"model": "m1"}, False
    )
    await receive(sock)  # the task frame
    return sock, pending


@pytest.mark.parametrize("status", [100, 101, 199, 600, 700, 99, 0, -1])
async def test_a_result_status_outside_200_599_is_refused_and_the_client_gets_502(
    upkeep: None, tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, status: Any
) -> None:
    sock, pending = await bound(tokens)
    got = await call(
        "POST",
        f"/api/v1/virtual/tasks/{pending.task_id}/result",
        token=tokens.publisher_plain,
        body=json.dumps({"status": status, "body": {"ok": 1}}).encode(),
    )
    assert "200-599" in api_error(got, 400)["message"]
    event = dict(await tasks.next_event(pending, 5))
    assert event["kind"] == "error"
    assert event["status"] == 502
    assert "invalid HTTP status" in str(event["message"])
    # The task is over: a good answer now is a 404.
    got = await call(
        "POST",
        f"/api/v1/virtual/tasks/{pending.task_id}/result",
        token=tokens.publisher_plain,
        body=json.dumps({"status": 200, "body": {}}).encode(),
    )
    assert api_error(got, 404)["code"] == "task_not_found"
    await sock.disconnect()


@pytest.mark.parametrize("status", ["200", True, None, 2.5, [200]])
async def test_a_result_status_that_is_not_a_number_is_400_and_changes_nothing(
    upkeep: None, tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub, status: Any
) -> None:
    sock, pending = await bound(tokens)
    url = f"/api/v1/virtual/tasks/{pending.task_id}/result"
    bad = json.dumps({"status": status, "body": {}}).encode()
    assert api_error(await call("POST", url, token=tokens.publisher_plain, body=bad), 400)
    good = b'{"status": 200, "body": {"ok": 1}}'
    assert (await call("POST", url, token=tokens.publisher_plain, body=good))[0] == 204
    event = dict(await tasks.next_event(pending, 5))
    assert (event["kind"], event["status"]) == ("result", 200)
    await sock.disconnect()


async def test_a_result_frame_with_status_1xx_gets_protocol_error_and_the_client_502(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    sock, pending = await bound(tokens)
    frame = {"type": "result", "taskId": pending.task_id, "status": 101, "body": {}}
    await sock.send_to(text_data=json.dumps(frame))
    refused = await receive(sock)
    assert refused["type"] == "protocol_error"
    assert refused["taskId"] == pending.task_id
    event = dict(await tasks.next_event(pending, 5))
    assert (event["kind"], event["status"]) == ("error", 502)
    await sock.send_to(text_data=json.dumps({"type": "heartbeat"}))
    assert (await receive(sock))["type"] == "heartbeat"
    await sock.disconnect()


async def test_a_bad_status_for_another_tokens_task_is_400_and_changes_nothing(
    upkeep: None, tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    sock, pending = await bound(tokens)
    for task_id in ("nope", pending.task_id):
        got = await call(
            "POST",
            f"/api/v1/virtual/tasks/{task_id}/result",
            token=tokens.other_publisher_plain,
            body=b'{"status": 101, "body": {}}',
        )
        assert api_error(got, 400)["code"] == "invalid_request"
    # The task is still open for its own publisher.
    got = await call(
        "POST",
        f"/api/v1/virtual/tasks/{pending.task_id}/result",
        token=tokens.publisher_plain,
        body=b'{"status": 200, "body": {"ok": 1}}',
    )
    assert got[0] == 204, got[2]
    event = dict(await tasks.next_event(pending, 5))
    assert (event["kind"], event["status"]) == ("result", 200)
    await sock.disconnect()


def spec_events(stream: bytes) -> list[str]:
    """The data of each event, read as the SSE spec says (lines end at CRLF, CR or LF)."""
    events: list[str] = []
    data: list[str] = []
    text = stream.decode()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for line in lines:
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


def sdk_events(stream: bytes) -> list[str]:
    """The data of each event as the openai SDK reads it (httpx's splitlines)."""
    from openai._streaming import SSEDecoder

    decoder = SSEDecoder()
    events = []
    for line in stream.decode().splitlines():
        event = decoder.decode(line)
        if event is not None:
            events.append(event.data)
    return events


FORGERIES = [
    "x\r\ndata: [DONE]",
    "x\rdata: [DONE]",
    "x\r\rdata: [DONE]",
    "x\n\ndata: [DONE]",
    "x\r\n\r\ndata: [DONE]\r\n\r\n",
    "x\u2028\u2028data: [DONE]",
    "x\x85\x85data: [DONE]",
    "x\x0b\x0cdata: [DONE]\x1c\x1d\x1e",
    "\n\n",
    "",
]


@pytest.mark.parametrize("text", FORGERIES)
def test_chunk_data_can_never_end_its_event_or_forge_another(text: str) -> None:
    framed = sse.data(text) + sse.DONE
    for read in (spec_events, sdk_events):
        events = read(framed)
        assert len(events) == 2, (read.__name__, framed, events)
        assert events[1] == "[DONE]"
        assert events[0] != "[DONE]"
    # Line ends become LF (SSE carries no CR); nothing else of the text is lost.
    assert spec_events(framed)[0] == text.replace("\r\n", "\n").replace("\r", "\n").translate(
        {c: f"\\u{c:04x}" for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}
    )


def test_chunk_json_with_line_breaks_reads_back_as_the_same_json() -> None:
    value = {"choices": [{"delta": {"content": "a\u2028b\x85c"}}]}
    text = '{\r\n "choices": [{"delta": {"content": "a\u2028b\x85c"}}]\n}'
    for read in (spec_events, sdk_events):
        assert json.loads(read(sse.data(text))[0]) == value


def test_plain_chunk_data_is_framed_as_before() -> None:
    assert sse.data('{"a": 1}') == b'data: {"a": 1}\n\n'
    assert sse.data("[DONE]") == sse.DONE


@pytest.mark.parametrize("task_id", ["a%00b", "x" * 65, "a.b", "%E2%9C%93"])
async def test_an_answer_for_a_task_id_that_cannot_exist_is_404(
    upkeep: None, tokens: Tokens, hub: hub_mod.Hub, task_id: str
) -> None:
    got = await call(
        "POST",
        f"/api/v1/virtual/tasks/{unquote(task_id)}/result",
        token=tokens.publisher_plain,
        body=b'{"status": 200, "body": {}}',
    )
    assert api_error(got, 404)["code"] == "task_not_found"


def test_the_task_id_rule_takes_every_id_the_broker_makes() -> None:
    assert all(is_task_id(secrets.token_urlsafe(18)) for _ in range(2000))


# --- found by the fuzzer (tests/test_fuzz.py) -------------------------------------------------

HUGE_INT = b'{"model": ' + b"9" * 5000 + b"}"  # past Python's 4,300-digit int conversion


@pytest.mark.parametrize(("path", "role"), BODY_ROUTES)
async def test_an_integer_of_5000_digits_is_400_invalid_json_not_a_500(
    upkeep: None, virtual_llm: None, tokens: Tokens, path: str, role: str
) -> None:
    """orjson refuses it and the standard library raised ValueError (not a JSONDecodeError)."""
    before = await sync_to_async(snapshot)()
    got = await call("POST", path, token=token_of(tokens, role), body=HUGE_INT)
    error = error_of(path, got, 400)
    assert error["code"] == "invalid_json"
    assert "4300 digits" in error["message"]
    assert await sync_to_async(snapshot)() == before


async def test_an_integer_of_5000_digits_in_a_frame_gets_protocol_error_and_the_socket_stays(
    tokens: Tokens, virtual_llm: None, hub: hub_mod.Hub
) -> None:
    """It closed the socket with 1011 (and the session's rows went inactive)."""
    sock = ws("/api/v1/virtual/sessions/sess/ws", tokens.publisher_plain)
    await sock.connect()
    assert (await receive(sock))["type"] == "ready"
    await sock.send_to(bytes_data=HUGE_INT)
    refused = await receive(sock)
    assert (refused["type"], refused["code"]) == ("protocol_error", "invalid_json")
    await sock.send_to(text_data=json.dumps({"type": "heartbeat"}))
    assert await receive(sock) == {"type": "heartbeat", "ok": True, "llms": 1}
    assert await sync_to_async(lambda: Llm.objects.get(name="m1").status)() == "active"
    await sock.disconnect()


@pytest.mark.parametrize("method", ["OPTIONS", "POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/api/docs/", "/api/schema/"])
async def test_the_openapi_routes_refuse_other_methods_with_a_json_405(
    upkeep: None, method: str, path: str
) -> None:
    """OPTIONS /api/docs/ was a 500 (DRF rendered its metadata through the page's HTML
    renderer, which has no template for it), and a 405 on /api/schema/ came as
    ``application/vnd.oai.openapi+json``."""
    got = await call(method, path)
    if method == "OPTIONS" and path == "/api/schema/":
        assert got[0] == 200, got  # DRF's metadata, as JSON
        return
    assert api_error(got, 405)["code"] == "method_not_allowed"


async def test_the_openapi_routes_still_serve_the_document_and_the_page(upkeep: None) -> None:
    status, headers, content = await call("GET", "/api/schema/")
    assert status == 200
    assert json.loads(content)["openapi"].startswith("3.")
    status, headers, content = await call("GET", "/api/docs/")
    assert status == 200
    assert headers[b"Content-Type"].startswith(b"text/html")


def raw_http(broker: Broker, head: bytes) -> tuple[int, bytes, bytes]:
    """One request written byte for byte (no client library would send these): the status,
    the Content-Type and the body of the answer."""
    with socket.create_connection(("127.0.0.1", broker.ports[0]), timeout=10) as sock:
        sock.sendall(head + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # to read
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    status, ctype, body = 0, b"", b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage | h11.ConnectionClosed):
        if isinstance(event, h11.Response):
            status = event.status_code
            ctype = dict(event.headers).get(b"content-type", b"")
        elif isinstance(event, h11.Data):
            body += event.data
    return status, ctype, body


@pytest.mark.django_db(transaction=False)
@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\r\nAccept: \x85\r\n",
        b"GET /api/v1/llms HTTP/1.1\r\nAuthorization: Bearer \x0b\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: a\x1cb\r\n",
    ],
    ids=["nel-in-accept", "vt-in-authorization", "fs-in-content-type"],
)
def test_daphnes_own_400s_are_the_contracts_json_on_the_api(embedded: Broker, head: bytes) -> None:
    """daphne refuses header values with these bytes before the application sees them, with
    its HTML page (the fuzzer found ``Accept: \\x85``); on /api/ and /v1/ they are the
    contract's JSON now. (A path or query string that is not ASCII Twisted refuses first,
    with a bare 400 without a body, below daphne.)"""
    status, ctype, body = raw_http(embedded, head)
    assert (status, ctype) == (400, b"application/json"), body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request"
    assert error["message"]
    if b" /v1/" in head:
        assert error["type"] == "invalid_request_error"
    else:
        assert set(error) == {"code", "message"}
    # The admin keeps daphne's page.
    status, ctype, _ = raw_http(embedded, b"GET /admin/ HTTP/1.1\r\nAccept: \x85\r\n")
    assert (status, ctype) == (400, b"text/html; charset=utf-8")


@pytest.mark.parametrize("fmt", [b"0", b"", b"xml", b"%00"])
async def test_a_format_no_renderer_has_is_a_json_404_with_a_message(
    upkeep: None, fmt: bytes
) -> None:
    """``GET /api/schema/?format=0`` answered ``{"error": {"code": "not_found", "message": ""}}``
    (found by tests/test_fuzz.py)."""
    got = await call("GET", "/api/schema/", query=b"format=" + fmt)
    if got[0] == 200:  # an empty format is no format: the document
        assert fmt == b""
        return
    error = api_error(got, 404)
    assert error["code"] == "not_found"
    assert error["message"]


@pytest.mark.django_db(transaction=False)
def test_a_head_answer_has_no_body_and_the_connection_serves_on(embedded: Broker) -> None:
    """HEAD /api/schema/ (a body of several parts) sent all but the first part after its
    headers: the next answer on the kept-alive connection was read from the middle of the
    document, "illegal request line" (found by tests/test_fuzz.py)."""
    with httpx.Client(base_url=embedded.url(), timeout=10) as client:
        for _ in range(2):
            head = client.head("/api/schema/")
            assert head.status_code == 200
            assert head.content == b""
            after = client.get("/healthz")  # on the same connection
            assert after.status_code == 200, after.text[:300]
    status, _, body = raw_http(embedded, b"HEAD /api/schema/ HTTP/1.1\r\n")
    assert (status, body) == (200, b"")

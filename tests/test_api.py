"""The HTTP API in process (Django's test clients): tokens and roles, the error shapes, and
every bad input the contract names — each answered with a clear 4xx and changing nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import AsyncClient, Client, override_settings

from tests.conftest import Tokens
from tests.contract_support import LLM_KEYS
from virtual_llms.auth import token_revoke
from virtual_llms.models import ApiToken, Llm, ProviderSession

pytestmark = pytest.mark.django_db(transaction=True)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(client: Client, path: str, body: Any, token: str) -> Any:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", headers=auth(token))


def api_error(response: Any, status: int) -> dict[str, Any]:
    """The /api/ error shape: {"error": {"code", "message"}}."""
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["message"]
    return dict(error)


def openai_error(response: Any, status: int) -> dict[str, Any]:
    """The /v1/ error shape: {"error": {"message", "type", "code"}}."""
    assert response.status_code == status, response.content
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["message"]
    return dict(error)


def register(client: Client, tokens: Tokens, name: str = "m1", sid: str | None = "s1") -> Any:
    return post(
        client,
        "/api/v1/virtual/register",
        {"providerSessionId": sid, "providers": [{"name": name, "type": "openai", "model": "q"}]},
        tokens.publisher_plain,
    )


def snapshot() -> tuple[list[tuple[Any, ...]], int]:
    rows = list(Llm.objects.order_by("name").values_list("name", "status", "version", "model"))
    return rows, ProviderSession.objects.count()


# --- tokens and roles ---------------------------------------------------------------------------


def test_register_returns_the_contract_row(client: Client, tokens: Tokens) -> None:
    response = register(client, tokens)
    assert response.status_code == 200
    body = response.json()
    assert body["providerSessionId"] == "s1"
    row = body["llms"][0]
    assert set(row) == LLM_KEYS
    assert row["kind"] == "virtual"
    assert row["lastHeartbeatAt"].endswith("Z") or "+" in row["lastHeartbeatAt"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/v1/virtual/register"),
        ("post", "/api/v1/virtual/heartbeat"),
        ("get", "/api/v1/llms"),
        ("get", "/v1/models"),
        ("post", "/v1/chat/completions"),
        ("post", "/api/v1/virtual/tasks/x/result"),
        ("get", "/api/v1/virtual/sessions/s1/stream"),
    ],
)
def test_missing_or_unknown_token_is_401(client: Client, db: None, method: str, path: str) -> None:
    for headers in ({}, auth("mcpd_nope_nope"), auth("garbage"), {"Authorization": "Basic x"}):
        response = getattr(client, method)(path, content_type="application/json", headers=headers)
        assert response.status_code == 401, (path, headers, response.content)
        assert "error" in json.loads(response.content)


def test_wrong_role_is_403(client: Client, tokens: Tokens) -> None:
    api_error(
        register(client, Tokens(**{**tokens.__dict__, "publisher_plain": tokens.client_plain})), 403
    )
    api_error(client.get("/api/v1/llms", headers=auth(tokens.publisher_plain)), 403)
    api_error(post(client, "/api/v1/llms", {}, tokens.client_plain), 403)
    api_error(client.delete("/api/v1/llms/x", headers=auth(tokens.client_plain)), 403)
    openai_error(client.get("/v1/models", headers=auth(tokens.publisher_plain)), 403)
    api_error(
        post(
            client,
            "/api/v1/virtual/tasks/x/result",
            {"status": 200, "body": {}},
            tokens.client_plain,
        ),
        403,
    )


def test_a_revoked_token_is_refused_at_once(client: Client, tokens: Tokens) -> None:
    assert client.get("/api/v1/llms", headers=auth(tokens.client_plain)).status_code == 200
    token_revoke(token=ApiToken.objects.get(pk=tokens.client.pk))
    api_error(client.get("/api/v1/llms", headers=auth(tokens.client_plain)), 401)


def test_last_used_at_is_kept(client: Client, tokens: Tokens) -> None:
    assert ApiToken.objects.get(label="cli").last_used_at is None
    client.get("/api/v1/llms", headers=auth(tokens.client_plain))
    assert ApiToken.objects.get(label="cli").last_used_at is not None


# --- bad input: 400, nothing changes ------------------------------------------------------------

GOOD = {"name": "ok", "type": "openai", "model": "q"}
BAD_REGISTERS: list[tuple[str, Any]] = [
    ("malformed JSON", '{"providers": ['),
    ("not an object", "[1, 2]"),
    ("providers missing", {"providerSessionId": None}),
    ("providers not a list", {"providerSessionId": None, "providers": "x"}),
    ("provider not an object", {"providerSessionId": None, "providers": [3]}),
    ("name missing", {"providers": [{"type": "openai", "model": "q"}]}),
    ("name with a space", {"providers": [{**GOOD, "name": "a b"}]}),
    ("name starting with a dash", {"providers": [{**GOOD, "name": "-a"}]}),
    ("name of 129 characters", {"providers": [{**GOOD, "name": "a" * 129}]}),
    ("name empty", {"providers": [{**GOOD, "name": ""}]}),
    ("name a number", {"providers": [{**GOOD, "name": 12}]}),
    ("type a list", {"providers": [{**GOOD, "type": ["openai"]}]}),
    ("type too long", {"providers": [{**GOOD, "type": "t" * 33}]}),
    ("model too long", {"providers": [{**GOOD, "model": "m" * 257}]}),
    ("model null", {"providers": [{**GOOD, "model": None}]}),
    ("tier a number", {"providers": [{**GOOD, "tier": 1}]}),
    ("description too long", {"providers": [{**GOOD, "description": "d" * 4097}]}),
    ("status inactive", {"providers": [{**GOOD, "status": "inactive"}]}),
    ("session id with a slash", {"providerSessionId": "a/b", "providers": [GOOD]}),
    ("session id a number", {"providerSessionId": 7, "providers": [GOOD]}),
    ("session id too long", {"providerSessionId": "s" * 65, "providers": [GOOD]}),
    ("duplicate names", {"providers": [GOOD, GOOD]}),
]


@pytest.mark.parametrize(("why", "body"), BAD_REGISTERS, ids=[b[0] for b in BAD_REGISTERS])
def test_bad_register_bodies_are_400_and_change_nothing(
    client: Client, tokens: Tokens, why: str, body: Any
) -> None:
    assert register(client, tokens, "existing").status_code == 200
    before = snapshot()
    error = api_error(post(client, "/api/v1/virtual/register", body, tokens.publisher_plain), 400)
    assert error["code"] in {"invalid_request", "invalid_json"}
    assert snapshot() == before
    # and the server goes on serving
    assert client.get("/api/v1/llms/existing", headers=auth(tokens.client_plain)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/virtual/heartbeat", {}),
        ("/api/v1/virtual/heartbeat", {"providerSessionId": 5}),
        ("/api/v1/virtual/status", {"providerSessionId": "s1", "llmName": "m1"}),
        ("/api/v1/virtual/status", {"providerSessionId": "s1", "llmName": "m1", "status": "on"}),
        (
            "/api/v1/virtual/status",
            {"providerSessionId": "s1", "llmName": "m1", "status": "inactive"},
        ),
        ("/api/v1/virtual/status", "not json"),
    ],
)
def test_bad_heartbeat_and_status_bodies_are_400(
    client: Client, tokens: Tokens, path: str, body: Any
) -> None:
    register(client, tokens)
    before = snapshot()
    api_error(post(client, path, body, tokens.publisher_plain), 400)
    assert snapshot() == before


def test_heartbeat_unknown_session_is_404_and_status_of_unknown_llm_is_404(
    client: Client, tokens: Tokens
) -> None:
    register(client, tokens)
    api_error(
        post(
            client,
            "/api/v1/virtual/heartbeat",
            {"providerSessionId": "nope"},
            tokens.publisher_plain,
        ),
        404,
    )
    api_error(
        post(
            client,
            "/api/v1/virtual/status",
            {"providerSessionId": "s1", "llmName": "other", "status": "active"},
            tokens.publisher_plain,
        ),
        404,
    )
    ok = post(
        client, "/api/v1/virtual/heartbeat", {"providerSessionId": "s1"}, tokens.publisher_plain
    )
    assert ok.json() == {"ok": True, "llms": 1}


def test_another_tokens_session_is_403(client: Client, tokens: Tokens) -> None:
    register(client, tokens)
    before = snapshot()
    response = post(
        client,
        "/api/v1/virtual/register",
        {"providerSessionId": "s1", "providers": [GOOD]},
        tokens.other_publisher_plain,
    )
    api_error(response, 403)
    api_error(
        post(
            client,
            "/api/v1/virtual/heartbeat",
            {"providerSessionId": "s1"},
            tokens.other_publisher_plain,
        ),
        403,
    )
    assert snapshot() == before


# --- the REST API -------------------------------------------------------------------------------


def test_public_llm_create_get_evict(client: Client, tokens: Tokens) -> None:
    body = {
        "name": "org/gpt:4o",
        "type": "openai",
        "model": "gpt-4o",
        "url": "https://api.example.com/v1",
        "apiKey": "sk-secret",
    }
    response = post(client, "/api/v1/llms", body, tokens.admin_plain)
    assert response.status_code == 201
    assert b"sk-secret" not in response.content
    assert "apiKey" not in response.json()
    assert response.json()["kind"] == "public"
    api_error(post(client, "/api/v1/llms", body, tokens.admin_plain), 409)
    got = client.get("/api/v1/llms/org/gpt:4o", headers=auth(tokens.client_plain))
    assert got.status_code == 200
    assert b"sk-secret" not in got.content
    api_error(client.get("/api/v1/llms/nope", headers=auth(tokens.client_plain)), 404)
    assert (
        client.delete("/api/v1/llms/org/gpt:4o", headers=auth(tokens.admin_plain)).status_code
        == 204
    )
    assert not Llm.objects.exists()
    api_error(client.delete("/api/v1/llms/org/gpt:4o", headers=auth(tokens.admin_plain)), 404)


@pytest.mark.parametrize(
    "patch",
    [
        {"url": "not a url"},
        {"url": "ftp://host/v1"},
        {"name": "bad name"},
        {"model": 3},
        {"apiKey": 12},
        {"type": None},
    ],
)
def test_bad_public_llm_bodies_are_400(
    client: Client, tokens: Tokens, patch: dict[str, Any]
) -> None:
    body = {"name": "p", "type": "openai", "model": "m", "url": "https://h/v1", **patch}
    api_error(post(client, "/api/v1/llms", body, tokens.admin_plain), 400)
    assert not Llm.objects.exists()


# --- the client API: bad input ------------------------------------------------------------------


async def test_client_bad_input_gets_openai_errors(tokens: Tokens, async_orm: None) -> None:
    client = AsyncClient()
    headers = {"Authorization": f"Bearer {tokens.client_plain}"}

    async def call(data: str | bytes) -> Any:
        return await client.post(
            "/v1/chat/completions", data=data, content_type="application/json", headers=headers
        )

    assert openai_error(await call("{oops"), 400)["code"] == "invalid_json"
    assert openai_error(await call("[]"), 400)["type"] == "invalid_request_error"
    assert openai_error(await call("{}"), 400)["code"] == "missing_model"
    assert openai_error(await call('{"model": 5}'), 400)["code"] == "missing_model"
    assert openai_error(await call('{"model": "m", "stream": "yes"}'), 400)
    assert openai_error(await call('{"model": "nope"}'), 404)["code"] == "model_not_found"
    with override_settings(MCPD_MAX_BODY_BYTES=1000):
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
        assert openai_error(await call(big), 413)["code"] == "payload_too_large"
    # The server goes on.
    assert (await client.get("/v1/models", headers=headers)).status_code == 200


async def test_inactive_or_streamless_rows_are_503_with_retry_after(
    tokens: Tokens, hub: object
) -> None:
    from asgiref.sync import sync_to_async

    client = AsyncClient()
    await sync_to_async(register)(Client(), tokens)
    headers = {"Authorization": f"Bearer {tokens.client_plain}"}
    body = json.dumps({"model": "m1", "messages": []})
    # Registered, but no control stream: offline.
    response = await client.post(
        "/v1/chat/completions", data=body, content_type="application/json", headers=headers
    )
    assert openai_error(response, 503)["code"] == "publisher_offline"
    assert response["Retry-After"]
    await sync_to_async(Llm.objects.filter(name="m1").update)(status="inactive")
    response = await client.post(
        "/v1/chat/completions", data=body, content_type="application/json", headers=headers
    )
    assert openai_error(response, 503)["code"] == "publisher_offline"


@pytest.mark.parametrize(
    ("suffix", "body"),
    [
        ("result", {"status": "200", "body": {}}),
        ("result", {"status": 99, "body": {}}),
        ("result", {"status": 200}),
        ("chunks", {"chunks": []}),
        ("chunks", {"chunks": [{"data": 1}]}),
        ("chunks", {"chunks": [{"data": "x", "done": "yes"}]}),
        ("error", {"error": ""}),
        ("error", {}),
    ],
)
async def test_bad_task_posts_are_400(
    tokens: Tokens, async_orm: None, suffix: str, body: dict[str, Any]
) -> None:
    client = AsyncClient()
    response = await client.post(
        f"/api/v1/virtual/tasks/whatever/{suffix}",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {tokens.publisher_plain}"},
    )
    api_error(response, 400)


async def test_unknown_task_is_404(tokens: Tokens, hub: object) -> None:
    client = AsyncClient()
    response = await client.post(
        "/api/v1/virtual/tasks/unknown/result",
        data=json.dumps({"status": 200, "body": {}}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {tokens.publisher_plain}"},
    )
    assert api_error(response, 404)["code"] == "task_not_found"


def test_control_stream_of_another_tokens_session_is_403(client: Client, tokens: Tokens) -> None:
    register(client, tokens)
    response = client.get(
        "/api/v1/virtual/sessions/s1/stream", headers=auth(tokens.other_publisher_plain)
    )
    api_error(response, 403)
    api_error(
        client.get("/api/v1/virtual/sessions/zzz/stream", headers=auth(tokens.publisher_plain)), 404
    )


async def test_wrong_methods_and_unknown_routes_answer_in_the_contracts_shapes(
    tokens: Tokens, async_orm: None
) -> None:
    client = AsyncClient()
    headers = {"Authorization": f"Bearer {tokens.client_plain}"}
    response = await client.get("/v1/chat/completions", headers=headers)
    assert openai_error(response, 405)["code"] == "method_not_allowed"
    assert response["Allow"] == "POST"
    openai_error(await client.post("/v1/models", headers=headers), 405)
    api_error(await client.get("/api/v1/virtual/tasks/x/result", headers=headers), 405)
    with override_settings(DEBUG=False):
        openai_error(await client.get("/v1/nothing-here", headers=headers), 404)
        api_error(await client.get("/api/v1/nothing-here", headers=headers), 404)

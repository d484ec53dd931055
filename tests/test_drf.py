"""Lenient JSON on /api/ (virtual_llms/drf.py): JSON answers whatever ``Accept`` says, bodies
read as JSON whatever ``Content-Type`` says, and a body that is not JSON is a 400
``invalid_json`` that changes nothing (PROTOCOL.md "OpenAI surface")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from tests.conftest import Tokens
from tests.test_api import api_error, auth, register, snapshot
from virtual_llms.auth import token_revoke
from virtual_llms.models import ApiToken, Llm

pytestmark = pytest.mark.django_db(transaction=True)

# What httpx-sse puts on the headers of a client it is given, and so on every later call.
SSE = {"Accept": "text/event-stream"}
BODY = {"providerSessionId": "s1", "providers": [{"name": "m1", "type": "openai", "model": "q"}]}


def raw_post(
    client: Client, path: str, body: bytes, token: str, content_type: str = "", **headers: str
) -> Any:
    """A POST with exactly this body and Content-Type ("" sends none)."""
    return client.generic(
        "POST", path, data=body, content_type=content_type, headers={**auth(token), **headers}
    )


def assert_json(response: Any, status: int) -> Any:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    return json.loads(response.content)


def test_heartbeat_and_status_answer_json_to_an_event_stream_accept(
    client: Client, tokens: Tokens
) -> None:
    register(client, tokens)
    beat = json.dumps({"providerSessionId": "s1"}).encode()
    body = assert_json(
        raw_post(
            client,
            "/api/v1/virtual/heartbeat",
            beat,
            tokens.publisher_plain,
            "application/json",
            **SSE,
        ),
        200,
    )
    assert body == {"ok": True, "llms": 1}
    status = json.dumps({"providerSessionId": "s1", "llmName": "m1", "status": "hibernating"})
    row = assert_json(
        raw_post(
            client,
            "/api/v1/virtual/status",
            status.encode(),
            tokens.publisher_plain,
            "application/json",
            **SSE,
        ),
        200,
    )
    assert row["status"] == "hibernating"
    for accept in ("text/html", "application/xml", "*/*;q=0.1", "nonsense"):
        listing = client.get("/api/v1/llms", headers={**auth(tokens.admin_plain), "Accept": accept})
        assert [llm["name"] for llm in assert_json(listing, 200)] == ["m1"]


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_is_read_whatever_its_content_type(
    client: Client, tokens: Tokens, content_type: str
) -> None:
    response = raw_post(
        client,
        "/api/v1/virtual/register",
        json.dumps(BODY).encode(),
        tokens.publisher_plain,
        content_type,
    )
    body = assert_json(response, 200)
    assert body["providerSessionId"] == "s1"
    assert Llm.objects.get(name="m1").provider_session_id == "s1"


@pytest.mark.parametrize("content_type", ["", "application/json", "text/plain"])
@pytest.mark.parametrize("body", [b"{not json", b"name=m1&type=openai", b"\xff\xfe\xfa", b"{"])
def test_a_body_that_is_not_json_is_400_invalid_json_and_changes_nothing(
    client: Client, tokens: Tokens, content_type: str, body: bytes
) -> None:
    register(client, tokens)
    before = snapshot()
    response = raw_post(
        client, "/api/v1/virtual/register", body, tokens.publisher_plain, content_type
    )
    assert response["Content-Type"] == "application/json"
    assert api_error(response, 400)["code"] == "invalid_json"
    assert snapshot() == before


def test_a_json_body_that_is_not_an_object_is_invalid_request(
    client: Client, tokens: Tokens
) -> None:
    response = raw_post(client, "/api/v1/virtual/register", b"[1, 2]", tokens.publisher_plain)
    assert api_error(response, 400)["code"] == "invalid_request"


def test_a_revoked_publisher_re_registering_from_an_sse_client_gets_401(
    client: Client, tokens: Tokens
) -> None:
    register(client, tokens)
    token_revoke(token=ApiToken.objects.get(pk=tokens.publisher.pk))
    before = snapshot()
    response = raw_post(
        client,
        "/api/v1/virtual/register",
        json.dumps(BODY).encode(),
        tokens.publisher_plain,
        "application/json",
        **SSE,
    )
    assert response["Content-Type"] == "application/json"
    assert api_error(response, 401)["code"] == "unauthorized"
    assert snapshot() == before


def test_every_drf_error_has_a_meaningful_code(client: Client, tokens: Tokens) -> None:
    """No generic ``error``: each status a DRF view answers names what went wrong."""
    headers = {**auth(tokens.admin_plain), **SSE}
    codes = {
        api_error(client.put("/api/v1/llms", headers=headers), 405)["code"],
        api_error(client.get("/api/v1/llms/nope", headers=headers), 404)["code"],
        api_error(client.get("/api/v1/llms", headers=SSE), 401)["code"],
        api_error(
            client.post(
                "/api/v1/llms", data=b"{}", content_type="", headers=auth(tokens.client_plain)
            ),
            403,
        )["code"],
    }
    assert codes == {"method_not_allowed", "llm_not_found", "unauthorized", "forbidden"}

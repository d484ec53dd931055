"""Contract: the registry (register / heartbeat / status), tokens and roles, the REST API and
/v1/models — PROTOCOL.md "Roles and tokens", "The Llm row", "Publisher API", "REST API"."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import openai
import pytest

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, chat_answer
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    STREAM_W,
    Json,
    admin_revoke,
    assert_api_error,
    assert_llm_row,
    assert_openai_error,
    assert_ws_refused,
    auth,
    chat_body,
    get_row,
    http,
    is_iso_with_zone,
    llm_list,
    model_ids,
    parse_time,
    post_chat,
    prime,
    provider,
    publisher,
    sdk,
    uname,
    wait_status,
)

pytestmark = pytest.mark.multiproc


async def create_public(
    broker: Broker, name: str, *, url: str = "https://upstream.example/v1", **extra: Any
) -> httpx.Response:
    async with http(broker.token("admin")) as client:
        return await client.post(
            f"{broker.url(0)}/api/v1/llms",
            json={"name": name, "type": "openai", "model": f"pub/{name}", "url": url, **extra},
        )


async def register_raw(broker: Broker, token: str, body: Any, worker: int = 0) -> httpx.Response:
    async with http(token) as client:
        if isinstance(body, bytes):
            return await client.post(
                f"{broker.url(worker)}/api/v1/virtual/register",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        return await client.post(f"{broker.url(worker)}/api/v1/virtual/register", json=body)


# --- register --------------------------------------------------------------------------------


async def test_register_inserts_virtual_rows(broker: Broker) -> None:
    a, h = uname("reg-new"), uname("reg-hib")
    pub = ContractPublisher(broker.url(0), broker.token("publisher"))
    try:
        response = await pub.register(
            [
                provider(a, tier="slow", description="first one"),
                provider(h, status="hibernating"),
            ],
            session_id=None,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"providerSessionId", "llms"}, body
        sid = body["providerSessionId"]
        uuid.UUID(sid)  # a null id gets a new UUID
        rows = {row["name"]: row for row in body["llms"]}
        assert set(rows) == {a, h}
        for row in rows.values():
            assert_llm_row(row)
            assert row["kind"] == "virtual"
            assert row["providerSessionId"] == sid
            assert row["type"] == "openai"
            assert is_iso_with_zone(row["lastHeartbeatAt"])
            assert row["inactiveSince"] is None
        assert rows[a]["status"] == "active"  # the default
        assert rows[a]["model"] == f"upstream/{a}"
        assert rows[a]["tier"] == "slow"
        assert rows[a]["description"] == "first one"
        assert rows[h]["status"] == "hibernating"
        # Every worker sees the same rows.
        for worker in range(broker.n):
            shown = await get_row(broker, a, worker)
            assert shown is not None
            assert shown["id"] == rows[a]["id"]
    finally:
        await pub.aclose()


async def test_register_accepts_every_allowed_name_character(broker: Broker) -> None:
    tail = uuid.uuid4().hex[:8]
    names = [f"Org/model_v1.5:7b-Q4-{tail}", f"9{tail}" + "z" * 119]
    assert len(names[1]) == 128
    async with publisher(broker, "sse", [provider(n) for n in names], connect=False):
        for name in names:
            row = await get_row(broker, name)
            assert row is not None
            assert row["name"] == name
        assert set(names) <= await model_ids(broker)


async def test_register_same_session_updates_in_place(broker: Broker) -> None:
    name = uname("reg-sticky")
    async with publisher(broker, "sse", [provider(name, model="m-1")], connect=False) as pub:
        first = await get_row(broker, name)
        assert first is not None
        response = await pub.register([provider(name, model="m-updated")], url=broker.url(2))
        assert response.status_code == 200, response.text
        assert response.json()["providerSessionId"] == pub.session_id
        (row,) = response.json()["llms"]
        assert row["id"] == first["id"]
        assert row["model"] == "m-updated"
        assert row["status"] == "active"
        assert row["providerSessionId"] == pub.session_id


async def test_register_over_public_name_is_409(broker: Broker) -> None:
    public, fresh = uname("reg-public"), uname("reg-fresh")
    assert (await create_public(broker, public)).status_code == 201
    pub = ContractPublisher(broker.url(1), broker.token("publisher"))
    try:
        response = await pub.register([provider(fresh), provider(public)])
        err = assert_api_error(response, 409, "name_conflict")
        assert err["message"] == f"Cannot publish over public LLM '{public}'"
        row = await get_row(broker, public)
        assert row is not None
        assert row["kind"] == "public"
        assert row["providerSessionId"] is None
        assert await get_row(broker, fresh) is None  # all or nothing
    finally:
        await pub.aclose()


@pytest.mark.parametrize("status", ["active", "hibernating"])
async def test_register_name_live_under_other_session_is_409(broker: Broker, status: str) -> None:
    name = uname("reg-taken")
    async with publisher(broker, "sse", [provider(name, status=status)], connect=False) as owner:
        other = ContractPublisher(broker.url(2), broker.token("publisher"))  # same token
        try:
            response = await other.register([provider(name, model="thief")])
            assert response.status_code == 409, response.text
            err = assert_api_error(response, 409)
            assert err["message"] == f"'{name}' is already active under a different session"
            row = await get_row(broker, name)
            assert row is not None
            assert row["providerSessionId"] == owner.session_id
            assert row["status"] == status
            assert row["model"] == f"upstream/{name}"
        finally:
            await other.aclose()


async def test_register_adopts_inactive_row_of_same_token(broker: Broker) -> None:
    name, keep = uname("reg-adopt"), uname("reg-keep")
    async with publisher(broker, "sse", [provider(name), provider(keep)], connect=False) as old:
        before = await get_row(broker, name)
        assert before is not None
        # Leaving the name out of the list makes its row inactive.
        response = await old.register([provider(keep)])
        assert response.status_code == 200, response.text
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "inactive"
        assert is_iso_with_zone(row["inactiveSince"])
        kept = await get_row(broker, keep)
        assert kept is not None
        assert kept["status"] == "active"

        new = ContractPublisher(broker.url(2), broker.token("publisher"))
        try:
            response = await new.register([provider(name, model="m-2", status="hibernating")])
            assert response.status_code == 200, response.text
            assert new.session_id != old.session_id
            (adopted,) = response.json()["llms"]
            assert adopted["id"] == before["id"]
            assert adopted["providerSessionId"] == new.session_id
            assert adopted["status"] == "hibernating"
            assert adopted["inactiveSince"] is None
            assert adopted["model"] == "m-2"
        finally:
            await new.aclose()


async def test_register_inactive_row_of_other_token_is_409(broker: Broker) -> None:
    name, keep = uname("reg-foreign"), uname("reg-keep")
    async with publisher(broker, "sse", [provider(name), provider(keep)], connect=False) as owner:
        assert (await owner.register([provider(keep)])).status_code == 200
        before = await get_row(broker, name)
        assert before is not None
        assert before["status"] == "inactive"
        stranger = ContractPublisher(broker.url(1), broker.new_token("publisher"))
        try:
            response = await stranger.register([provider(name, model="stolen")])
            assert_api_error(response, 409)
            after = await get_row(broker, name)
            assert after == before  # nothing changed
            # Once an admin evicts the row, the name is free.
            async with http(broker.token("admin")) as admin:
                deleted = await admin.delete(f"{broker.url(2)}/api/v1/llms/{name}")
            assert deleted.status_code == 204, deleted.text
            response = await stranger.register([provider(name, model="fresh")])
            assert response.status_code == 200, response.text
            assert response.json()["llms"][0]["providerSessionId"] == stranger.session_id
        finally:
            await stranger.aclose()


async def test_register_is_all_or_nothing(broker: Broker) -> None:
    mine, fresh, public = uname("aon-mine"), uname("aon-fresh"), uname("aon-public")
    assert (await create_public(broker, public)).status_code == 201
    async with publisher(broker, "sse", [provider(mine, model="m-1")], connect=False) as pub:
        before = await get_row(broker, mine)
        response = await pub.register(
            [provider(mine, model="m-2"), provider(fresh), provider(public)]
        )
        assert_api_error(response, 409, "name_conflict")
        assert await get_row(broker, mine) == before  # neither updated nor left out
        assert await get_row(broker, fresh) is None
        # A second kind of failure, a row live under another session.
        async with publisher(broker, "sse", [provider(uname("aon-x"))], connect=False) as other:
            taken = uname("aon-taken")
            assert (await other.register([provider(taken)])).status_code == 200
            response = await pub.register([provider(mine, model="m-3"), provider(taken)])
            assert_api_error(response, 409)
            assert await get_row(broker, mine) == before


async def test_register_session_of_other_token_is_403(broker: Broker) -> None:
    name = uname("reg-own")
    async with publisher(broker, "sse", [provider(name)], connect=False) as owner:
        before = await get_row(broker, name)
        intruder_token = broker.new_token("publisher")
        intruder = uname("reg-intruder")
        body = {"providerSessionId": owner.session_id, "providers": [provider(intruder)]}
        response = await register_raw(broker, intruder_token, body, worker=1)
        assert_api_error(response, 403)
        # The same list, naming only the owner's row, is refused too.
        body = {"providerSessionId": owner.session_id, "providers": [provider(name, model="x")]}
        assert_api_error(await register_raw(broker, intruder_token, body, worker=2), 403)
        assert await get_row(broker, intruder) is None
        assert await get_row(broker, name) == before
        # The other calls that name the session are refused as well.
        async with http(intruder_token) as client:
            url = broker.url(1)
            response = await client.post(
                f"{url}/api/v1/virtual/heartbeat", json={"providerSessionId": owner.session_id}
            )
            assert_api_error(response, 403)
            response = await client.post(
                f"{url}/api/v1/virtual/status",
                json={
                    "providerSessionId": owner.session_id,
                    "llmName": name,
                    "status": "hibernating",
                },
            )
            assert_api_error(response, 403)
            response = await client.get(
                f"{url}/api/v1/virtual/sessions/{owner.session_id}/stream", timeout=5.0
            )
            assert_api_error(response, 403)
        await assert_ws_refused(
            f"{broker.ws_url(1)}/api/v1/virtual/sessions/{owner.session_id}/ws",
            auth(intruder_token),
            403,
        )
        assert await get_row(broker, name) == before


BAD_PROVIDERS: list[tuple[str, Any]] = [
    ("name-missing", {"type": "openai", "model": "m"}),
    ("type-missing", {"name": "ok-name-t", "model": "m"}),
    ("model-missing", {"name": "ok-name-m", "type": "openai"}),
    ("name-int", {"name": 42, "type": "openai", "model": "m"}),
    ("model-int", {"name": "ok-name-mi", "type": "openai", "model": 7}),
    ("type-list", {"name": "ok-name-tl", "type": ["openai"], "model": "m"}),
    ("tier-int", {"name": "ok-name-ti", "type": "openai", "model": "m", "tier": 3}),
    (
        "status-inactive",
        {"name": "ok-name-si", "type": "openai", "model": "m", "status": "inactive"},
    ),
    ("status-bogus", {"name": "ok-name-sb", "type": "openai", "model": "m", "status": "asleep"}),
    ("name-empty", {"name": "", "type": "openai", "model": "m"}),
    ("name-leading-dash", {"name": "-abc", "type": "openai", "model": "m"}),
    ("name-leading-dot", {"name": ".abc", "type": "openai", "model": "m"}),
    ("name-space", {"name": "has space", "type": "openai", "model": "m"}),
    ("name-at", {"name": "user@host", "type": "openai", "model": "m"}),
    ("name-unicode", {"name": "modèle", "type": "openai", "model": "m"}),
    ("name-129", {"name": "a" * 129, "type": "openai", "model": "m"}),
    ("type-overlong", {"name": "ok-name-to", "type": "t" * 5000, "model": "m"}),
    ("model-overlong", {"name": "ok-name-mo", "type": "openai", "model": "m" * 5000}),
    ("tier-overlong", {"name": "ok-name-tio", "type": "openai", "model": "m", "tier": "x" * 5000}),
    (
        "description-overlong",
        {"name": "ok-name-do", "type": "openai", "model": "m", "description": "d" * 100_000},
    ),
    ("provider-not-object", "just-a-string"),
]


BAD_BODIES: list[tuple[str, Any]] = [
    ("malformed-json", b'{"providerSessionId": null, "providers": ['),
    ("empty", b""),
    ("not-json", b"providers=1"),
    ("array", b"[]"),
    ("string", b'"register"'),
    ("providers-missing", {"providerSessionId": "SID"}),
    ("providers-null", {"providerSessionId": "SID", "providers": None}),
    ("providers-object", {"providerSessionId": "SID", "providers": {"name": "x"}}),
    ("session-int", {"providerSessionId": 12345, "providers": ["MINE"]}),
    ("session-object", {"providerSessionId": {"id": "SID"}, "providers": ["MINE"]}),
]


async def test_register_bad_bodies_are_400_and_change_nothing(broker: Broker) -> None:
    """Every case of BAD_PROVIDERS (a bad entry after two good ones) and BAD_BODIES; the
    failures are collected so one run names every case the broker gets wrong."""
    mine, fresh = uname("bad-mine"), uname("bad-fresh")
    failures: list[str] = []
    async with publisher(broker, "sse", [provider(mine, model="m-1")], connect=False) as pub:
        before = await get_row(broker, mine)
        cases: list[tuple[str, Any]] = []
        for case, bad in BAD_PROVIDERS:
            if isinstance(bad, dict) and str(bad.get("name", "")).startswith("ok-name"):
                bad = {**bad, "name": uname(bad["name"])}
            providers = [provider(mine, model="m-2"), provider(fresh), bad]
            cases.append((case, {"providerSessionId": pub.session_id, "providers": providers}))
        for case, bad in BAD_BODIES:
            if isinstance(bad, dict):
                text = json.dumps(bad).replace('"SID"', json.dumps(pub.session_id))
                text = text.replace('"MINE"', json.dumps(provider(mine, model="m-2")))
                bad = json.loads(text)
            cases.append((case, bad))
        for i, (case, body) in enumerate(cases):
            response = await register_raw(broker, pub.token, body, worker=i % 3)
            try:
                assert_api_error(response, 400)
            except AssertionError as exc:
                failures.append(f"{case}: {exc}"[:300])
            if await get_row(broker, mine) != before or await get_row(broker, fresh) is not None:
                failures.append(f"{case}: the request changed the registry")
                await pub.register([provider(mine, model="m-1")])
                before = await get_row(broker, mine)
    assert not failures, "\n".join(failures)


# --- heartbeat and status ----------------------------------------------------------------------


async def test_heartbeat_bumps_and_revives(broker: Broker, transport: str) -> None:
    a, b = uname("hb-a"), uname("hb-b")
    async with publisher(broker, transport, [provider(a), provider(b)]) as pub:
        before = await get_row(broker, a)
        assert before is not None
        await asyncio.sleep(0.05)
        response = await pub.heartbeat(url=broker.url(2))
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True, "llms": 2}
        after = await get_row(broker, a)
        assert after is not None
        assert parse_time(after["lastHeartbeatAt"]) > parse_time(before["lastHeartbeatAt"])
        # Closing the stream makes the rows inactive; a heartbeat revives them.
        await pub.disconnect()
        await wait_status(broker, a, "inactive")
        await wait_status(broker, b, "inactive")
        response = await pub.heartbeat(url=broker.url(0))
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True, "llms": 2}
        for name in (a, b):
            row = await get_row(broker, name)
            assert row is not None
            assert row["status"] == "active"
            assert row["inactiveSince"] is None


async def test_heartbeat_unknown_session_is_404_and_bad_body_400(broker: Broker) -> None:
    async with http(broker.token("publisher")) as client:
        url = f"{broker.url(1)}/api/v1/virtual/heartbeat"
        response = await client.post(url, json={"providerSessionId": f"nope-{uuid.uuid4()}"})
        assert_api_error(response, 404)
        assert_api_error(await client.post(url, json={}), 400)
        assert_api_error(await client.post(url, json={"providerSessionId": 5}), 400)
        response = await client.post(
            url, content=b"{oops", headers={"Content-Type": "application/json"}
        )
        assert_api_error(response, 400)


async def test_status_sets_hibernating_and_active(broker: Broker) -> None:
    name = uname("st")
    async with publisher(broker, "sse", [provider(name)], connect=False) as pub:
        response = await pub.set_status(name, "hibernating")
        assert response.status_code == 200, response.text
        row = response.json()
        assert_llm_row(row)
        assert row["name"] == name
        assert row["status"] == "hibernating"
        assert name in await model_ids(broker)  # hibernating rows are listed
        response = await pub.set_status(name, "active")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "active"
        assert_api_error(await pub.set_status(name, "inactive"), 400)
        assert_api_error(await pub.set_status(name, "sleepy"), 400)
        assert_api_error(await pub.set_status(uname("st-unknown"), "active"), 404)
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "active"
        async with http(pub.token) as client:
            response = await client.post(
                f"{broker.url(2)}/api/v1/virtual/status",
                json={
                    "providerSessionId": f"nope-{uuid.uuid4()}",
                    "llmName": name,
                    "status": "active",
                },
            )
        assert_api_error(response, 404)


# --- tokens and roles --------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/virtual/register", {"providerSessionId": None, "providers": []}),
    ("POST", "/api/v1/virtual/heartbeat", {"providerSessionId": "x"}),
    (
        "POST",
        "/api/v1/virtual/status",
        {"providerSessionId": "x", "llmName": "y", "status": "active"},
    ),
    ("GET", "/api/v1/virtual/sessions/x/stream", None),
    ("POST", "/api/v1/virtual/tasks/x/result", {"status": 200, "body": {}}),
    ("POST", "/api/v1/virtual/tasks/x/chunks", {"chunks": [{"data": "x"}]}),
    ("POST", "/api/v1/virtual/tasks/x/error", {"error": "x"}),
    ("GET", "/api/v1/llms", None),
    ("GET", "/api/v1/llms/some-name", None),
    ("POST", "/api/v1/llms", {"name": "n", "type": "openai", "model": "m", "url": "https://h/v1"}),
    ("DELETE", "/api/v1/llms/some-name", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "m", "input": "x"}),
]


def assert_route_error(path: str, response: httpx.Response, status: int) -> None:
    if path.startswith("/v1/"):
        assert_openai_error(response, status)
    else:
        assert_api_error(response, status)


async def test_missing_or_unknown_token_is_401(broker: Broker) -> None:
    headers_cases: list[dict[str, str]] = [
        {},
        auth("mcpd_not_a_real_token_" + uuid.uuid4().hex),
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
    ]
    async with httpx.AsyncClient(timeout=10.0) as client:
        for method, path, body in ROUTES:
            for headers in headers_cases:
                response = await client.request(
                    method, f"{broker.url(1)}{path}", json=body, headers=headers
                )
                assert response.status_code == 401, (method, path, headers, response.text[:300])
                assert_route_error(path, response, 401)
    # The control socket refuses the handshake.
    for headers in headers_cases[:2]:
        await assert_ws_refused(f"{broker.ws_url(1)}/api/v1/virtual/sessions/x/ws", headers, 401)


async def test_wrong_role_is_403(broker: Broker) -> None:
    name = uname("role")
    async with publisher(broker, "sse", [provider(name)], connect=False) as pub:
        sid = pub.session_id
        publisher_only: list[tuple[str, str, Any]] = [
            (
                "POST",
                "/api/v1/virtual/register",
                {"providerSessionId": None, "providers": [provider(uname())]},
            ),
            ("POST", "/api/v1/virtual/heartbeat", {"providerSessionId": sid}),
            (
                "POST",
                "/api/v1/virtual/status",
                {"providerSessionId": sid, "llmName": name, "status": "active"},
            ),
            ("GET", f"/api/v1/virtual/sessions/{sid}/stream", None),
            ("POST", "/api/v1/virtual/tasks/x/result", {"status": 200, "body": {}}),
            ("POST", "/api/v1/virtual/tasks/x/chunks", {"chunks": [{"data": "x"}]}),
            ("POST", "/api/v1/virtual/tasks/x/error", {"error": "x"}),
        ]
        admin_only: list[tuple[str, str, Any]] = [
            (
                "POST",
                "/api/v1/llms",
                {"name": uname(), "type": "openai", "model": "m", "url": "https://h/v1"},
            ),
            ("DELETE", f"/api/v1/llms/{name}", None),
        ]
        client_routes: list[tuple[str, str, Any]] = [
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat_body(name)),
            ("POST", "/v1/completions", {"model": name, "prompt": "x"}),
            ("POST", "/v1/embeddings", {"model": name, "input": "x"}),
            ("GET", "/api/v1/llms", None),
            ("GET", f"/api/v1/llms/{name}", None),
        ]
        cases = (
            [("client", route) for route in publisher_only + admin_only]
            + [("admin", route) for route in publisher_only]
            # v1.1 "Pools": a publisher may read a row's detail (its own backends only).
            + [
                ("publisher", route)
                for route in admin_only + client_routes
                if route != ("GET", f"/api/v1/llms/{name}", None)
            ]
        )
        async with httpx.AsyncClient(timeout=10.0) as client:
            for role, (method, path, body) in cases:
                response = await client.request(
                    method, f"{broker.url(2)}{path}", json=body, headers=auth(broker.token(role))
                )
                assert response.status_code == 403, (role, method, path, response.text[:300])
                assert_route_error(path, response, 403)
        # Nothing of it changed the row, and the socket refuses a client.
        row = await get_row(broker, name)
        assert row is not None
        assert row["status"] == "active"
        await assert_ws_refused(
            f"{broker.ws_url(1)}/api/v1/virtual/sessions/{sid}/ws",
            auth(broker.token("client")),
            403,
        )


async def test_admin_may_do_what_a_client_may(broker: Broker) -> None:
    name = uname("adm")
    async with (
        publisher(broker, "sse", [provider(name)]) as pub,
        http(broker.token("admin")) as client,
    ):
        response = await client.get(f"{broker.url(0)}/v1/models")
        assert response.status_code == 200
        assert name in {item["id"] for item in response.json()["data"]}
        answer = asyncio.create_task(
            client.post(f"{broker.url(0)}/v1/chat/completions", json=chat_body(name))
        )
        await pub_answer(pub, broker)
        response = await answer
        assert response.status_code == 200, response.text
        assert response.json() == chat_answer("ok")


async def pub_answer(pub: ContractPublisher, broker: Broker) -> None:
    frame = await pub.next_frame("infer")
    response = await pub.result(frame["taskId"], 200, chat_answer("ok"), url=broker.url(RESULT_W))
    assert response.status_code == 204, response.text


@pytest.mark.parametrize(
    ("which", "transport"), [("broker3", "sse"), ("broker3", "ws"), ("embedded", "ws")]
)
async def test_revoked_publisher_token_refused_and_streams_closed(
    request: pytest.FixtureRequest, which: str, transport: str
) -> None:
    broker = prime(cast(Broker, request.getfixturevalue(which)))
    label = f"revoke-{uuid.uuid4().hex[:8]}"
    token = broker.new_token("publisher", label)
    name = uname("rev")
    async with publisher(broker, transport, [provider(name)], token=token) as pub:
        for worker in range(broker.n):  # warm any per-worker cache
            assert (await pub.heartbeat(url=broker.url(worker))).status_code == 200
        await admin_revoke(broker, label, worker=RESULT_W)
        for worker in range(broker.n):  # refused at once, on every worker
            assert_api_error(await pub.heartbeat(url=broker.url(worker)), 401)
        await asyncio.wait_for(pub.closed.wait(), 5.0)  # its stream is closed
        await wait_status(broker, name, "inactive")
        response = await pub.register([provider(name)])
        assert_api_error(response, 401)
        await assert_ws_refused(
            f"{broker.ws_url(1)}/api/v1/virtual/sessions/{pub.session_id}/ws", auth(token), 401
        )


async def test_revoked_client_token_refused_at_once(broker: Broker) -> None:
    label = f"revoke-cli-{uuid.uuid4().hex[:8]}"
    token = broker.new_token("client", label)
    async with http(token) as client:
        for worker in range(broker.n):
            assert (await client.get(f"{broker.url(worker)}/v1/models")).status_code == 200
        await admin_revoke(broker, label, worker=CLIENT_W)
        for worker in range(broker.n):
            assert_openai_error(await client.get(f"{broker.url(worker)}/v1/models"), 401)
            assert_api_error(await client.get(f"{broker.url(worker)}/api/v1/llms"), 401)
    async with sdk(broker, token=token) as client_sdk:
        with pytest.raises(openai.APIStatusError) as failed:
            await client_sdk.models.list()
        assert failed.value.status_code == 401


# --- REST API ----------------------------------------------------------------------------------


async def test_rest_list_and_detail_for_client(broker: Broker) -> None:
    a = uname("rest-a")
    slashy = f"org/{uname('rest')}:7b"
    async with (
        publisher(broker, "sse", [provider(a), provider(slashy)], connect=False),
        http(broker.token("client")) as client,
    ):
        response = await client.get(f"{broker.url(1)}/api/v1/llms")
        assert response.status_code == 200, response.text
        rows = {row["name"]: row for row in llm_list(response.json())}
        assert {a, slashy} <= set(rows)
        for row in rows.values():
            assert_llm_row(row)
        for name in (a, slashy):
            response = await client.get(f"{broker.url(2)}/api/v1/llms/{name}")
            assert response.status_code == 200, response.text
            assert_llm_row(response.json())
            assert response.json()["name"] == name
            assert response.json()["id"] == rows[name]["id"]
        response = await client.get(f"{broker.url(0)}/api/v1/llms/{uname('nope')}")
        assert_api_error(response, 404)


SECRET_PREFIX = "sk-contract-secret-"


async def test_rest_create_public_llm_hides_the_key(broker: Broker) -> None:
    name = uname("pub")
    secret = SECRET_PREFIX + uuid.uuid4().hex
    response = await create_public(
        broker, name, apiKey=secret, tier="slow", description="a public one"
    )
    assert response.status_code == 201, response.text
    assert secret not in response.text
    assert "apiKey" not in response.text
    row = response.json()
    assert_llm_row(row)
    assert row["name"] == name
    assert row["kind"] == "public"
    assert row["status"] == "active"
    assert row["providerSessionId"] is None
    assert row["url"] == "https://upstream.example/v1"
    assert row["model"] == f"pub/{name}"
    assert row["tier"] == "slow"
    assert row["description"] == "a public one"
    async with http(broker.token("admin")) as client:
        for path in ("/api/v1/llms", f"/api/v1/llms/{name}", "/v1/models"):
            response = await client.get(f"{broker.url(1)}{path}")
            assert response.status_code == 200
            assert secret not in response.text
            assert "apiKey" not in response.text
    assert name in await model_ids(broker)


async def test_rest_create_public_bad_bodies(broker: Broker) -> None:
    taken = uname("pub-taken")
    assert (await create_public(broker, taken)).status_code == 201
    bad: list[Any] = [
        {"name": uname(), "type": "openai", "model": "m"},  # no url
        {"name": uname(), "type": "openai", "url": "https://h/v1"},  # no model
        {"name": "bad name", "type": "openai", "model": "m", "url": "https://h/v1"},
        {"name": "a" * 129, "type": "openai", "model": "m", "url": "https://h/v1"},
        {"name": uname(), "type": "openai", "model": "m", "url": "not a url"},
        {"name": uname(), "type": "openai", "model": 5, "url": "https://h/v1"},
        {"name": uname(), "type": "openai", "model": "m", "url": "https://h/v1", "apiKey": 5},
        [],
    ]
    async with http(broker.token("admin")) as client:
        url = f"{broker.url(2)}/api/v1/llms"
        for body in bad:
            response = await client.post(url, json=body)
            assert_api_error(response, 400)
            if isinstance(body, dict) and isinstance(body.get("name"), str):
                assert await get_row(broker, body["name"]) is None
        response = await client.post(
            url, content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert_api_error(response, 400)
        # A name that exists is a conflict, and the row is untouched.
        before = await get_row(broker, taken)
        response = await client.post(
            url, json={"name": taken, "type": "openai", "model": "other", "url": "https://o/v1"}
        )
        assert response.status_code in (400, 409), response.text
        assert_api_error(response, response.status_code)
        assert await get_row(broker, taken) == before


class _Upstream(BaseHTTPRequestHandler):
    seen: list[Json] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"null")
        type(self).seen.append(
            {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
        )
        status, answer = (
            (400, {"error": {"message": "bad temp"}})
            if body.get("temperature") == 9
            else (200, chat_answer("from upstream"))
        )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[Json]]]:
    """A small OpenAI-compatible upstream for public rows."""

    class Handler(_Upstream):
        seen: list[Json] = []

    handler = Handler
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler.seen
    server.shutdown()
    server.server_close()


async def test_public_llm_is_proxied_with_its_key(
    broker: Broker, upstream: tuple[str, list[Json]]
) -> None:
    base, seen = upstream
    name = uname("proxy")
    secret = SECRET_PREFIX + uuid.uuid4().hex
    response = await create_public(broker, name, url=base, apiKey=secret)
    assert response.status_code == 201, response.text
    async with sdk(broker) as client:
        answer = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "from upstream"
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], temperature=9
            )
        assert refused.value.status_code == 400  # an upstream 400 stays a 400
    mine = [s for s in seen if s["body"].get("model") == f"pub/{name}"]
    assert len(mine) == 2, seen
    assert mine[0]["path"] == "/v1/chat/completions"
    assert mine[0]["authorization"] == f"Bearer {secret}"
    assert mine[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]


async def test_rest_evict(broker: Broker, transport: str) -> None:
    name = uname("evict")
    async with publisher(broker, transport, [provider(name)]) as pub:
        waiting = asyncio.create_task(post_chat(broker, chat_body(name), worker=CLIENT_W))
        frame = await pub.next_frame("infer")
        async with http(broker.token("admin")) as admin:
            response = await admin.delete(f"{broker.url(RESULT_W)}/api/v1/llms/{name}")
            assert response.status_code == 204, response.text
            assert response.content == b""
            response = await asyncio.wait_for(waiting, 10.0)
            assert_openai_error(response, 502, "llm_evicted")
            assert await get_row(broker, name) is None  # gone at once
            assert name not in await model_ids(broker, worker=STREAM_W)
            # A late result for the task of the evicted row changes nothing.
            late = await pub.result(frame["taskId"], 200, chat_answer("late"))
            assert late.status_code == 404
            response = await post_chat(broker, chat_body(name))
            assert_openai_error(response, 404, "model_not_found")
            # The publisher may register the name again.
            response = await pub.register([provider(name)])
            assert response.status_code == 200, response.text
            response = await admin.delete(f"{broker.url(0)}/api/v1/llms/{uname('nope')}")
            assert_api_error(response, 404)


async def test_rest_evict_public(broker: Broker) -> None:
    name = uname("evict-pub")
    assert (await create_public(broker, name)).status_code == 201
    async with http(broker.token("admin")) as admin:
        response = await admin.delete(f"{broker.url(1)}/api/v1/llms/{name}")
        assert response.status_code == 204
        assert_api_error(await admin.delete(f"{broker.url(2)}/api/v1/llms/{name}"), 404)
    assert await get_row(broker, name) is None


# --- /v1/models --------------------------------------------------------------------------------


async def test_models_lists_active_and_hibernating_not_inactive(broker: Broker) -> None:
    active, sleeping, gone = uname("mod-a"), uname("mod-h"), uname("mod-i")
    providers = [provider(active), provider(sleeping, status="hibernating"), provider(gone)]
    async with publisher(broker, "sse", providers, connect=False) as pub:
        assert (
            await pub.register([provider(active), provider(sleeping, status="hibernating")])
        ).status_code == 200
        async with http(broker.token("client")) as client:
            response = await client.get(f"{broker.url(2)}/v1/models")
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "list"
        items = {item["id"]: item for item in body["data"]}
        assert active in items
        assert sleeping in items
        assert gone not in items
        for item in body["data"]:
            assert item["object"] == "model"
            assert isinstance(item["created"], int)
            assert isinstance(item["owned_by"], str)
        async with sdk(broker, worker=1) as client_sdk:
            listed = {model.id async for model in client_sdk.models.list()}
        assert {active, sleeping} <= listed
        assert gone not in listed

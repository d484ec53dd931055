"""Helpers for the black-box contract tests (tests/test_contract_*.py).

Everything here talks to a running broker from the outside, as PROTOCOL.md describes it:
HTTP, SSE, WebSocket, the ``openai`` SDK, ``manage.py`` and the operator's Django admin.
It imports nothing from mcpd.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import openai
import websockets

from tests.cluster import ROOT, Broker
from tests.contract_publisher import ContractPublisher

Json = dict[str, Any]

# The keys of an Llm row (PROTOCOL.md "The Llm row").
LLM_KEYS = {
    "id",
    "name",
    "type",
    "model",
    "url",
    "tier",
    "description",
    "kind",
    "providerSessionId",
    "status",
    "lastHeartbeatAt",
    "inactiveSince",
    "version",
    "createdAt",
    "updatedAt",
}

# The three roles of the cross-worker path: client request, control stream, result POST.
CLIENT_W, STREAM_W, RESULT_W = 0, 1, 2


def prime(broker: Broker) -> Broker:
    """Make the broker's shared tokens now (not inside a test's concurrent tasks), showing
    ``manage.py``'s stderr when that fails."""
    for role in ("publisher", "client", "admin"):
        try:
            broker.token(role)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(f"createtoken {role} failed:\n{exc.stderr}") from exc
    return broker


def uname(prefix: str = "llm") -> str:
    """A name no other test uses (brokers are shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def provider(name: str, model: str | None = None, **extra: Any) -> Json:
    return {"name": name, "type": "openai", "model": model or f"upstream/{name}", **extra}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def http(token: str | None = None, timeout: float = 30.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(headers=auth(token) if token else {}, timeout=httpx.Timeout(timeout))


def sdk(broker: Broker, worker: int = CLIENT_W, token: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{broker.url(worker)}/v1",
        api_key=token or broker.token("client"),
        max_retries=0,
        timeout=60.0,
    )


def is_iso_with_zone(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


def parse_time(value: object) -> datetime:
    assert isinstance(value, str), value
    return datetime.fromisoformat(value)


BACKEND_KEYS = {
    "providerSessionId",
    "model",
    "status",
    "maxConcurrency",
    "inFlight",
    "lastHeartbeatAt",
    "inactiveSince",
    "draining",
}


def assert_llm_row(row: Any) -> None:
    """The row has exactly the contract's keys, with well-formed times; a virtual row's
    detail also lists its ``backends`` (v1.1 "Pools"), each with exactly its keys."""
    assert isinstance(row, dict), row
    keys = set(row) - ({"backends"} if row.get("kind") == "virtual" else set())
    assert keys == LLM_KEYS, f"keys differ from the contract: {sorted(keys ^ LLM_KEYS)}"
    for backend in row.get("backends", []):
        assert set(backend) == BACKEND_KEYS, sorted(set(backend) ^ BACKEND_KEYS)
        assert backend["status"] in ("active", "inactive", "hibernating")
        assert isinstance(backend["inFlight"], int)
    assert row["kind"] in ("public", "virtual")
    assert row["status"] in ("active", "inactive", "hibernating")
    for key in ("createdAt", "updatedAt"):
        assert is_iso_with_zone(row[key]), (key, row[key])
    for key in ("lastHeartbeatAt", "inactiveSince"):
        assert row[key] is None or is_iso_with_zone(row[key]), (key, row[key])


def assert_api_error(response: httpx.Response, status: int, code: str | None = None) -> Json:
    """An /api/ error: ``{"error": {"code": "<snake_case>", "message": "<text>"}}``."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("code"), str), err
    assert re.fullmatch(r"[a-z][a-z0-9_]*", err["code"]), err
    assert isinstance(err.get("message"), str), err
    assert err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> Json:
    """A /v1/ error in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), dict), body
    err = body["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str), err
    assert err["message"], err
    assert isinstance(err["type"], str), err
    assert err["type"], err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def assert_offline(response: httpx.Response) -> None:
    """503 ``publisher_offline`` with a ``Retry-After`` of delay-seconds (or an HTTP date)."""
    assert_openai_error(response, 503, "publisher_offline")
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None, f"503 without Retry-After: {response.text}"
    assert retry_after.strip().isdigit() or "GMT" in retry_after, retry_after


def sdk_error_code(exc: openai.APIStatusError) -> object:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code")
    return None


def sdk_error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message"))
    return str(exc)


def llm_list(body: Any) -> list[Json]:
    """The rows of ``GET /api/v1/llms``. The contract does not give the envelope: accept a
    bare array, or an object holding the array under one of the usual keys."""
    if isinstance(body, list):
        return body
    assert isinstance(body, dict), body
    for key in ("llms", "data", "results", "items"):
        if isinstance(body.get(key), list):
            return list(body[key])
    raise AssertionError(f"no list of rows in {body!r:.300}")


async def get_row(broker: Broker, name: str, worker: int = 0) -> Json | None:
    """The row named ``name`` as the REST API shows it to an admin, or None on 404."""
    async with http(broker.token("admin")) as client:
        response = await client.get(f"{broker.url(worker)}/api/v1/llms/{name}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, (response.status_code, response.text)
    row = response.json()
    assert isinstance(row, dict)
    return row


async def model_ids(broker: Broker, worker: int = 0) -> set[str]:
    async with http(broker.token("client")) as client:
        response = await client.get(f"{broker.url(worker)}/v1/models")
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["data"]}


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.1
) -> float:
    """Poll ``check`` until true; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wake_waiting(broker: Broker) -> int:
    """How many calls wait for a wake, on all the broker's workers (each worker's
    ``mcpd_wake_waiting`` gauge in ``/metrics``)."""
    total = 0
    async with http(broker.token("admin")) as client:
        for worker in range(broker.n):
            response = await client.get(f"{broker.url(worker)}/metrics")
            assert response.status_code == 200, response.text
            found = re.search(r"^mcpd_wake_waiting ([0-9.e+]+)$", response.text, re.M)
            assert found, response.text[:500]
            total += int(float(found.group(1)))
    return total


async def wait_wake_waiting(broker: Broker, calls: int, timeout: float = 10.0) -> None:
    """Wait until ``calls`` calls wait for a wake: each has arrived and joined it."""

    async def check() -> bool:
        return await wake_waiting(broker) >= calls

    await wait_for(check, timeout)


async def wait_status(broker: Broker, name: str, status: str, timeout: float = 5.0) -> float:
    async def check() -> bool:
        row = await get_row(broker, name)
        return row is not None and row["status"] == status

    return await wait_for(check, timeout)


@asynccontextmanager
async def publisher(
    broker: Broker,
    transport: str,
    providers: list[Json],
    *,
    worker: int = STREAM_W,
    token: str | None = None,
    connect: bool = True,
) -> AsyncIterator[ContractPublisher]:
    """A registered publisher, its control stream held on ``worker``; closed on exit."""
    pub = ContractPublisher(
        broker.url(worker), token or broker.token("publisher"), transport=transport
    )
    try:
        response = await pub.register(providers)
        assert response.status_code == 200, response.text
        if connect:
            await pub.connect()
        yield pub
    finally:
        await pub.aclose()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """Parse an event stream into (event, data) pairs; comment lines are skipped."""
    events: list[tuple[str | None, str]] = []
    event: str | None = None
    data: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        events.append((event, "\n".join(data)))
    return events


async def post_chat(
    broker: Broker,
    body: Any,
    *,
    worker: int = CLIENT_W,
    token: str | None = None,
    endpoint: str = "/v1/chat/completions",
    timeout: float = 30.0,
) -> httpx.Response:
    """A raw client request (the whole body read)."""
    async with http(token or broker.token("client"), timeout=timeout) as client:
        if isinstance(body, (bytes, str)):
            return await client.post(
                f"{broker.url(worker)}{endpoint}",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        return await client.post(f"{broker.url(worker)}{endpoint}", json=body)


def chat_body(name: str, text: str = "hello", **extra: Any) -> Json:
    return {"model": name, "messages": [{"role": "user", "content": text}], **extra}


async def assert_ws_refused(url: str, headers: dict[str, str], status: int) -> None:
    """The control socket refuses these credentials. PROTOCOL.md gives HTTP statuses only;
    daphne cannot answer a handshake with 401, so either the handshake is refused (``status``,
    or daphne's 403), or the socket is closed at once with close code ``4000 + status`` (or
    1008, policy violation), having carried no ``ready`` frame."""
    handshake_status: int | None = None
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
            try:
                while True:
                    message = await asyncio.wait_for(ws.recv(), 5.0)
                    frame = json.loads(message)
                    assert frame.get("type") != "ready", f"refused credentials got {frame}"
                    assert frame.get("type") != "task", f"refused credentials got {frame}"
            except websockets.ConnectionClosed:
                pass
            assert ws.close_code in (4000 + status, 1008), (ws.close_code, ws.close_reason)
    except websockets.InvalidStatus as refused:
        handshake_status = refused.response.status_code
    if handshake_status is not None:
        assert handshake_status in (status, 403), handshake_status


# --- operator tools ------------------------------------------------------------------------------

_SUPERUSERS: dict[str, tuple[str, str]] = {}


def superuser(broker: Broker) -> tuple[str, str]:
    """An operator account for the Django admin (``manage.py createsuperuser``)."""
    if broker.tag not in _SUPERUSERS:
        username, password = f"op{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        subprocess.run(
            [
                sys.executable,
                "manage.py",
                "createsuperuser",
                "--noinput",
                "--username",
                username,
                "--email",
                f"{username}@example.com",
            ],
            cwd=ROOT,
            env={**broker.env, "DJANGO_SUPERUSER_PASSWORD": password},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        _SUPERUSERS[broker.tag] = (username, password)
    return _SUPERUSERS[broker.tag]


async def admin_revoke(broker: Broker, label: str, worker: int = 0) -> None:
    """Revoke the token labelled ``label`` as an operator does: the Django admin's
    "revoke" action on the token list."""
    username, password = superuser(broker)
    base = broker.url(worker)
    async with httpx.AsyncClient(base_url=base, timeout=30.0, follow_redirects=False) as web:
        await web.get("/admin/login/")
        csrf = web.cookies.get("csrftoken")
        assert csrf, "the admin login page set no CSRF cookie"
        response = await web.post(
            "/admin/login/?next=/admin/",
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": csrf,
                "next": "/admin/",
            },
            headers={"Referer": f"{base}/admin/login/"},
        )
        assert response.status_code == 302, (response.status_code, response.text[:500])
        listing = await web.get("/admin/virtual_llms/apitoken/", params={"q": label})
        assert listing.status_code == 200, listing.status_code
        ids = re.findall(r'name="_selected_action" value="(\d+)"', listing.text)
        assert len(ids) == 1, f"expected one token labelled {label}, found {ids}"
        csrf = web.cookies.get("csrftoken") or csrf
        response = await web.post(
            "/admin/virtual_llms/apitoken/",
            data={
                "action": "revoke",
                "_selected_action": ids[0],
                "index": "0",
                "csrfmiddlewaretoken": csrf,
            },
            headers={"Referer": f"{base}/admin/virtual_llms/apitoken/"},
        )
        assert response.status_code == 302, (response.status_code, response.text[:500])


def gcsweep(broker: Broker) -> tuple[int, int]:
    """Run ``manage.py gcsweep``; (markedInactive, deleted) from its output."""
    out = broker.manage("gcsweep").stdout
    return parse_gcsweep(out)


def parse_gcsweep(out: str) -> tuple[int, int]:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert lines, "gcsweep printed nothing"
    match = re.fullmatch(r"markedInactive=(\d+) deleted=(\d+)", lines[-1].strip())
    assert match, f"gcsweep's output is not 'markedInactive=<n> deleted=<n>': {out!r}"
    return int(match.group(1)), int(match.group(2))

"""Owners and pools in the registry (PROTOCOL.md v1.1 "Owners", "Pools"): who may join or
adopt a name, what each backend and the row derived from them say, draining, eviction of one
backend and the sweep. Through the HTTP API in process; runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from virtual_llms import backends, services
from virtual_llms.auth import token_create, token_revoke
from virtual_llms.models import ApiToken, Backend, Llm, ProviderSession

pytestmark = pytest.mark.django_db(transaction=True)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(path: str, body: Any, token: str) -> Any:
    return Client().post(
        path, data=json.dumps(body), content_type="application/json", headers=auth(token)
    )


def register(token: str, sid: str, name: str = "pool", **provider: Any) -> Any:
    entry = {"name": name, "type": "openai", "model": "q", **provider}
    return post("/api/v1/virtual/register", {"providerSessionId": sid, "providers": [entry]}, token)


def detail(token: str, name: str = "pool") -> Any:
    return Client().get(f"/api/v1/llms/{name}", headers=auth(token))


def publisher(label: str, owner: str = "") -> tuple[ApiToken, str]:
    return token_create(role="publisher", label=label, owner=owner)


def error_code(response: Any, status: int) -> str:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    return str(error["code"])


@pytest.fixture
def admin(db: None) -> str:
    return token_create(role="admin", label="ops")[1]


@pytest.fixture
def client_token(db: None) -> str:
    return token_create(role="client", label="team")[1]


def test_two_tokens_of_one_owner_serve_one_name_as_a_pool(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    assert register(a, "sa", pool=True, maxConcurrency=2).status_code == 200
    assert register(b, "sb", pool=True, maxConcurrency=4, model="q2").status_code == 200
    row = detail(admin).json()
    assert row["status"] == "active"
    assert row["providerSessionId"] == "sa"  # the oldest live backend
    assert row["model"] == "q"
    assert [(x["providerSessionId"], x["maxConcurrency"], x["model"]) for x in row["backends"]] == [
        ("sa", 2, "q"),
        ("sb", 4, "q2"),
    ]
    for entry in row["backends"]:
        assert entry["status"] == "active"
        assert entry["inFlight"] == 0
        assert entry["draining"] is False
        assert entry["inactiveSince"] is None
        assert entry["lastHeartbeatAt"]


def test_pool_membership_rules(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    _, stranger = publisher("other")
    assert register(a, "sa", pool=True).status_code == 200
    # another owner, pool or not: 409; the same owner without pool: 409 (v1's refusal)
    assert error_code(register(stranger, "sx", pool=True), 409) == "name_conflict"
    assert error_code(register(b, "sb"), 409) == "name_conflict"
    # a row first registered without pool is no pool
    assert register(a, "sa", name="solo").status_code == 200
    assert error_code(register(b, "sb", name="solo", pool=True), 409) == "name_conflict"
    # a public row: 409
    services.llm_create_public(name="pub", type="openai", model="m", url="http://x/v1")
    assert error_code(register(a, "sa", name="pub", pool=True), 409) == "name_conflict"
    assert Backend.objects.filter(llm__name="pool").count() == 1
    assert Backend.objects.filter(llm__name="solo").count() == 1


def test_an_owner_adopts_an_inactive_row_and_another_owner_never_does(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    _, stranger = publisher("other")
    assert register(a, "sa").status_code == 200
    services.session_unbind(session_id="sa")
    assert error_code(register(stranger, "sx"), 409) == "name_conflict"
    assert register(b, "sb").status_code == 200  # adopted: one backend, the new session's
    row = detail(admin).json()
    assert row["providerSessionId"] == "sb"
    assert [x["providerSessionId"] for x in row["backends"]] == ["sb"]


def test_tokens_without_owner_are_their_own_owner(admin: str) -> None:
    _, a = publisher("box-a")
    _, b = publisher("box-b")
    assert register(a, "sa", pool=True).status_code == 200
    assert error_code(register(b, "sb", pool=True), 409) == "name_conflict"


def test_a_session_still_belongs_to_its_token(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    assert register(a, "sa", pool=True).status_code == 200
    assert error_code(register(b, "sa", pool=True), 403) == "forbidden"


def test_the_row_is_derived_from_its_backends(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True)
    register(b, "sb", pool=True, status="hibernating")
    services.session_unbind(session_id="sa")  # the oldest backend's stream closed
    row = detail(admin).json()
    assert (row["status"], row["providerSessionId"], row["inactiveSince"]) == (
        "hibernating",
        "sb",
        None,
    )
    services.session_unbind(session_id="sb")
    row = detail(admin).json()
    assert row["status"] == "inactive"
    assert row["inactiveSince"] == max(x["inactiveSince"] for x in row["backends"])
    # a heartbeat revives its own backend only
    assert post("/api/v1/virtual/heartbeat", {"providerSessionId": "sa"}, a).status_code == 200
    statuses = {x["providerSessionId"]: x["status"] for x in detail(admin).json()["backends"]}
    assert statuses == {"sa": "active", "sb": "inactive"}
    assert detail(admin).json()["status"] == "active"


def test_revoking_one_token_takes_only_its_backends(admin: str) -> None:
    token_a, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True)
    register(b, "sb", pool=True)
    token_revoke(token=token_a)
    services.session_unbind(session_id="sa")  # what its stream's close does
    assert register(a, "sa", pool=True).status_code == 401
    row = detail(admin).json()
    assert row["status"] == "active"
    assert {x["providerSessionId"]: x["status"] for x in row["backends"]} == {
        "sa": "inactive",
        "sb": "active",
    }


def test_draining_from_the_publisher_and_from_the_admin_api(admin: str, client_token: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    register(a, "sa", pool=True)
    body = {"providerSessionId": "sa", "llmName": "pool", "status": "draining"}
    assert post("/api/v1/virtual/status", body, a).status_code == 200
    assert detail(admin).json()["backends"][0]["draining"] is True
    assert detail(admin).json()["status"] == "active"  # a draining backend is live
    body["status"] = "active"
    assert post("/api/v1/virtual/status", body, a).status_code == 200
    assert detail(admin).json()["backends"][0]["draining"] is False

    drain = "/api/v1/llms/pool/backends/sa/drain"
    assert error_code(post(drain, {}, client_token), 403) == "forbidden"
    response = post(drain, {}, admin)
    assert response.status_code == 200, response.content
    assert response.json()["draining"] is True
    assert response.json()["providerSessionId"] == "sa"
    assert post(drain, {"draining": False}, admin).json()["draining"] is False
    assert error_code(post("/api/v1/llms/pool/backends/nope/drain", {}, admin), 404)
    assert error_code(post(drain, {"draining": "yes"}, admin), 400) == "invalid_request"


def test_names_with_slashes_reach_the_drain_route(admin: str) -> None:
    _, a = publisher("box-a")
    register(a, "sa", name="org/model:7b", pool=True)
    response = post("/api/v1/llms/org/model:7b/backends/sa/drain", {}, admin)
    assert response.status_code == 200, response.content
    assert Backend.objects.get(llm__name="org/model:7b").draining


@pytest.mark.parametrize(
    "extra",
    [
        {"maxConcurrency": 0},
        {"maxConcurrency": 4097},
        {"maxConcurrency": "4"},
        {"maxConcurrency": 2.5},
        {"maxConcurrency": True},
        {"pool": "yes"},
        {"pool": 1},
    ],
)
def test_bad_pool_fields_are_400_and_change_nothing(extra: dict[str, Any]) -> None:
    _, a = publisher("box-a")
    assert error_code(register(a, "sa", **extra), 400) == "invalid_request"
    assert not Llm.objects.exists()
    assert not ProviderSession.objects.exists()


def test_a_publisher_reads_only_its_own_backends(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True)
    register(b, "sb", pool=True)
    assert [x["providerSessionId"] for x in detail(a).json()["backends"]] == ["sa"]
    assert [x["providerSessionId"] for x in detail(b).json()["backends"]] == ["sb"]
    assert len(detail(admin).json()["backends"]) == 2


def test_gcsweep_deletes_a_pools_expired_backend_and_the_row_with_its_last(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True)
    register(b, "sb", pool=True)
    services.session_unbind(session_id="sb")
    long_ago = timezone.now() - timedelta(days=1)
    Backend.objects.filter(session_id="sb").update(inactive_since=long_ago)
    result = services.gc_sweep()
    assert (result.deleted, result.backends_deleted) == (0, 1)
    assert [x["providerSessionId"] for x in detail(admin).json()["backends"]] == ["sa"]
    # the last backend goes stale, then expires: the row goes with it
    Backend.objects.filter(session_id="sa").update(last_heartbeat_at=long_ago)
    assert services.gc_sweep().marked_inactive == 1
    assert detail(admin).json()["status"] == "inactive"
    Backend.objects.filter(session_id="sa").update(inactive_since=long_ago)
    assert services.gc_sweep().deleted == 1
    assert not Llm.objects.filter(name="pool").exists()


def test_evicting_one_backend_keeps_the_pool(admin: str) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True)
    register(b, "sb", pool=True)
    backends.backend_evict(backend=Backend.objects.get(session_id="sa"))
    row = detail(admin).json()
    assert row["providerSessionId"] == "sb"
    assert [x["providerSessionId"] for x in row["backends"]] == ["sb"]
    backends.backend_evict(backend=Backend.objects.get(session_id="sb"))
    assert not Llm.objects.filter(name="pool").exists()


def test_createtoken_takes_an_owner() -> None:
    out, err = StringIO(), StringIO()
    call_command("createtoken", "publisher", "box-c", "--owner", "gpu-team", stdout=out, stderr=err)
    token = ApiToken.objects.get(label="box-c")
    assert token.owner == "gpu-team"
    assert out.getvalue().strip().startswith("mcpd_")


def test_owner_is_shown_and_edited_in_the_token_admin(admin_client: Client) -> None:
    token, _ = publisher("box-a", owner="gpu-team")
    page = admin_client.get("/admin/virtual_llms/apitoken/")
    assert b"gpu-team" in page.content
    change = f"/admin/virtual_llms/apitoken/{token.pk}/change/"
    response = admin_client.post(change, {"label": "box-a", "owner": "ml-team"})
    assert response.status_code == 302, response.content
    token.refresh_from_db()
    assert token.owner == "ml-team"


def test_the_admin_shows_backends_and_drains_undrains_and_evicts_them(
    admin_client: Client,
) -> None:
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    register(a, "sa", pool=True, maxConcurrency=3)
    register(b, "sb", pool=True)
    row = Llm.objects.get(name="pool")
    page = admin_client.get(f"/admin/virtual_llms/llm/{row.pk}/change/").content.decode()
    for text in (">sa<", ">sb<", "gpu-team"):
        assert text in page
    listing = admin_client.get("/admin/virtual_llms/backend/").content.decode()
    assert "0 / 3" in listing
    assert "0 / ∞" in listing
    ids = [str(pk) for pk in Backend.objects.order_by("pk").values_list("pk", flat=True)]
    changelist = "/admin/virtual_llms/backend/"
    for action, expected in (("drain", [True, True]), ("undrain", [False, False])):
        response = admin_client.post(
            changelist, {"action": action, "_selected_action": ids}, follow=True
        )
        assert response.status_code == 200
        assert list(Backend.objects.order_by("pk").values_list("draining", flat=True)) == expected
    admin_client.post(changelist, {"action": "evict", "_selected_action": ids[:1]})
    assert list(Backend.objects.values_list("session_id", flat=True)) == ["sb"]
    assert Llm.objects.get(name="pool").provider_session_id == "sb"


def test_quotas_per_owner_refuse_more_names_and_sessions(admin: str, settings: Any) -> None:
    """Issue 29: one owner's tokens hold at most MCPD_MAX_NAMES_PER_OWNER names and
    MCPD_MAX_SESSIONS_PER_OWNER sessions; past either, 409 quota_exceeded, nothing applied."""
    settings.MCPD_MAX_NAMES_PER_OWNER = 2
    settings.MCPD_MAX_SESSIONS_PER_OWNER = 2
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    assert register(a, "sa", name="one").status_code == 200
    assert register(b, "sb", name="two").status_code == 200
    assert error_code(register(a, "sa", name="three"), 409) == "quota_exceeded"
    assert not Llm.objects.filter(name="three").exists()
    assert register(a, "sa", name="one").status_code == 200  # what it holds stays fine
    assert error_code(register(b, "sc", name="two"), 409) == "quota_exceeded"  # 3rd session
    assert not ProviderSession.objects.filter(pk="sc").exists()
    _, other = publisher("elsewhere")  # another owner has its own quota
    assert register(other, "so", name="three").status_code == 200


def test_gcsweep_deletes_old_sessions_that_own_nothing(admin: str) -> None:
    _, a = publisher("box-a")
    assert register(a, "keep").status_code == 200
    assert post("/api/v1/virtual/register", {"providerSessionId": "empty", "providers": []}, a)
    long_ago = timezone.now() - timedelta(days=1)
    ProviderSession.objects.update(created_at=long_ago)
    assert services.gc_sweep(dry_run=True).sessions_deleted == 1
    assert ProviderSession.objects.filter(pk="empty").exists()
    assert services.gc_sweep().sessions_deleted == 1
    assert list(ProviderSession.objects.values_list("pk", flat=True)) == ["keep"]


def test_the_llm_list_pages_on_request(admin: str, client_token: str) -> None:
    """Issue 29: ?limit= gives a page in name order and a Link to the next; without it
    every row, as in v1."""
    _, a = publisher("box-a")
    for name in ("a1", "a2", "a3"):
        assert register(a, f"s-{name}", name=name).status_code == 200
    everything = Client().get("/api/v1/llms", headers=auth(client_token))
    assert [row["name"] for row in everything.json()] == ["a1", "a2", "a3"]
    first = Client().get("/api/v1/llms?limit=2", headers=auth(client_token))
    assert [row["name"] for row in first.json()] == ["a1", "a2"]
    assert first["Link"] == '</api/v1/llms?limit=2&after=a2>; rel="next"'
    last = Client().get("/api/v1/llms?limit=2&after=a2", headers=auth(client_token))
    assert [row["name"] for row in last.json()] == ["a3"]
    assert "Link" not in last
    for bad in ("0", "1001", "x", "-1"):
        response = Client().get(f"/api/v1/llms?limit={bad}", headers=auth(client_token))
        assert error_code(response, 400) == "invalid_request"


def test_the_llm_list_reads_no_backends(admin: str, client_token: str) -> None:
    """A pool's row carries what the list shows (backends.mirror): listing reads the rows
    alone, not every backend of every row; the detail reads its one row's."""
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    assert register(a, "sa", pool=True).status_code == 200
    assert register(b, "sb", pool=True).status_code == 200
    table = Backend._meta.db_table
    with CaptureQueriesContext(connection) as listed:
        rows = Client().get("/api/v1/llms", headers=auth(client_token)).json()
    assert [(row["name"], row["status"], row["providerSessionId"]) for row in rows] == [
        ("pool", "active", "sa")
    ]
    assert not [q["sql"] for q in listed.captured_queries if table in q["sql"]]
    with CaptureQueriesContext(connection) as one:
        assert len(detail(client_token).json()["backends"]) == 2
    assert [q["sql"] for q in one.captured_queries if table in q["sql"]]


def test_a_session_alone_on_its_name_can_make_it_a_pool(admin: str) -> None:
    """An agent restarted with pool = true keeps its session (sticky): the name becomes a
    pool, and another box of the owner may join."""
    _, a = publisher("box-a", owner="gpu-team")
    _, b = publisher("box-b", owner="gpu-team")
    assert register(a, "sa").status_code == 200
    assert error_code(register(b, "sb", pool=True), 409) == "name_conflict"
    assert register(a, "sa", pool=True).status_code == 200
    assert register(b, "sb", pool=True).status_code == 200
    assert Llm.objects.get(name="pool").pool
    # with another box serving it, a session cannot take the pool away
    assert error_code(register(a, "sa"), 409) == "name_conflict"
    assert Llm.objects.get(name="pool").pool

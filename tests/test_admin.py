"""Django admin for operators: lists, filters, search, evict, mark inactive, tokens."""

from __future__ import annotations

import re

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone

from virtual_llms import services
from virtual_llms.auth import authenticate_token, token_create
from virtual_llms.errors import ApiError
from virtual_llms.models import ApiToken, Llm, ProviderSession

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def rows() -> None:
    token, _ = token_create(role="publisher", label="gpu-box")
    ProviderSession.objects.create(pk="sess-a", token=token)
    for name, status in (("alpha", "active"), ("beta", "hibernating"), ("gamma", "inactive")):
        Llm.objects.create(
            name=name,
            type="openai",
            model=f"model-{name}",
            kind="virtual",
            provider_session_id="sess-a",
            publisher_token=token,
            status=status,
            last_heartbeat_at=timezone.now(),
        )
    services.llm_create_public(
        name="public-one", type="openai", model="gpt", url="https://h/v1", api_key="sk-hidden"
    )


def test_llm_list_filters_and_search(admin_client: Client, rows: None) -> None:
    page = admin_client.get("/admin/virtual_llms/llm/")
    assert page.status_code == 200
    html = page.content.decode()
    for name in ("alpha", "beta", "gamma", "public-one", "sess-a"):
        assert name in html
    assert "sk-hidden" not in html
    assert "mcpd — virtual LLM broker" in html  # templates/admin/base_site.html
    filtered = admin_client.get("/admin/virtual_llms/llm/?status__exact=hibernating").content
    assert b"beta" in filtered
    assert b"alpha</a>" not in filtered
    searched = admin_client.get("/admin/virtual_llms/llm/?q=model-gamma").content.decode()
    assert "gamma" in searched
    assert "beta</a>" not in searched


def test_llm_change_page_never_shows_the_api_key(admin_client: Client, rows: None) -> None:
    row = Llm.objects.get(name="public-one")
    page = admin_client.get(f"/admin/virtual_llms/llm/{row.pk}/change/")
    assert page.status_code == 200
    assert b"sk-hidden" not in page.content
    assert row.api_key_encrypted.encode() not in page.content


def test_evict_action_deletes_rows(admin_client: Client, rows: None) -> None:
    ids = [
        str(pk)
        for pk in Llm.objects.filter(name__in=["alpha", "beta"]).values_list("pk", flat=True)
    ]
    response = admin_client.post(
        "/admin/virtual_llms/llm/", {"action": "evict", "_selected_action": ids}, follow=True
    )
    assert response.status_code == 200
    assert "Evicted 2" in response.content.decode()
    assert set(Llm.objects.values_list("name", flat=True)) == {"gamma", "public-one"}


def test_mark_inactive_action(admin_client: Client, rows: None) -> None:
    ids = [str(pk) for pk in Llm.objects.values_list("pk", flat=True)]
    admin_client.post(
        "/admin/virtual_llms/llm/", {"action": "mark_inactive", "_selected_action": ids}
    )
    statuses = dict(Llm.objects.values_list("name", "status"))
    assert statuses == {
        "alpha": "inactive",
        "beta": "inactive",
        "gamma": "inactive",
        "public-one": "active",  # public rows are not the publisher's to lose
    }


def test_token_add_shows_the_token_once_and_revoke_refuses_it(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/virtual_llms/apitoken/add/", {"role": "client", "label": "team-a"}, follow=True
    )
    assert response.status_code == 200
    match = re.search(r"mcpd_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", response.content.decode())
    assert match, "the new token is shown once"
    plaintext = match[0]
    token = ApiToken.objects.get(label="team-a")
    assert authenticate_token(plaintext).pk == token.pk
    assert ApiToken.objects.count() == 1
    listing = admin_client.get("/admin/virtual_llms/apitoken/").content.decode()
    assert plaintext not in listing
    admin_client.post(
        "/admin/virtual_llms/apitoken/", {"action": "revoke", "_selected_action": [str(token.pk)]}
    )
    with pytest.raises(ApiError):
        authenticate_token(plaintext)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None


def test_token_limits_are_set_edited_and_listed_in_the_admin(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/virtual_llms/apitoken/add/",
        {"role": "client", "label": "capped", "rpm": "30", "tpm": "", "max_concurrency": "2"},
        follow=True,
    )
    assert response.status_code == 200
    token = ApiToken.objects.get(label="capped")
    assert (token.rpm, token.tpm, token.max_concurrency) == (30, None, 2)
    change = f"/admin/virtual_llms/apitoken/{token.pk}/change/"
    response = admin_client.post(
        change, {"label": "capped", "rpm": "", "tpm": "500", "max_concurrency": "2"}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    token.refresh_from_db()
    assert (token.rpm, token.tpm, token.max_concurrency) == (None, 500, 2)
    listing = admin_client.get("/admin/virtual_llms/apitoken/").content.decode()
    assert "column-tpm" in listing
    assert "column-max_concurrency" in listing
    assert '<td class="field-tpm">500</td>' in listing
    # Limits are for client tokens; a zero is no limit at all.
    response = admin_client.post(
        "/admin/virtual_llms/apitoken/add/", {"role": "admin", "label": "boss", "rpm": "5"}
    )
    assert response.status_code == 200
    assert "client tokens only" in response.content.decode()
    response = admin_client.post(change, {"label": "capped", "rpm": "0"})
    assert response.status_code == 200
    token.refresh_from_db()
    assert token.rpm is None
    assert not ApiToken.objects.filter(label="boss").exists()


def test_a_virtual_rows_publisher_fields_cannot_be_edited(admin_client: Client, rows: None) -> None:
    """Issue 28: renaming a live virtual row (or changing its status) in the admin made the
    broker and its publisher disagree. Those fields are read-only; a public row's are not."""
    row = Llm.objects.get(name="alpha")
    page = admin_client.get(f"/admin/virtual_llms/llm/{row.pk}/change/").content.decode()
    assert 'name="name"' not in page
    assert 'name="status"' not in page
    response = admin_client.post(
        f"/admin/virtual_llms/llm/{row.pk}/change/",
        {"name": "alpha-renamed", "status": "inactive", "model": "other"},
        follow=True,
    )
    assert response.status_code == 200
    row.refresh_from_db()
    assert (row.name, row.status, row.model) == ("alpha", "active", "model-alpha")
    public = Llm.objects.get(name="public-one")
    page = admin_client.get(f"/admin/virtual_llms/llm/{public.pk}/change/").content.decode()
    assert 'name="name"' in page


def test_the_token_change_page_revokes_with_a_post_button(admin_client: Client) -> None:
    """Issue 28: the token change page has a Revoke button (only the list action before)."""
    token, plaintext = token_create(role="publisher", label="box-b")
    change = f"/admin/virtual_llms/apitoken/{token.pk}/change/"
    page = admin_client.get(change).content.decode()
    revoke = f"/admin/virtual_llms/apitoken/{token.pk}/revoke/"
    assert f'action="{revoke}"' in page
    assert admin_client.get(revoke).status_code == 405  # a GET never revokes
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None
    response = admin_client.post(revoke, follow=True)
    assert response.redirect_chain[-1][0] == change
    assert "Revoked box-b." in response.content.decode()
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    with pytest.raises(ApiError):
        authenticate_token(plaintext)
    assert f'action="{revoke}"' not in admin_client.get(change).content.decode()


def test_the_token_revoke_button_needs_the_csrf_token(admin_user: object) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)  # type: ignore[arg-type]
    token, _ = token_create(role="client", label="team-c")
    response = client.post(f"/admin/virtual_llms/apitoken/{token.pk}/revoke/")
    assert response.status_code == 403
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None


def test_the_sessions_list_says_which_session_holds_a_stream(
    admin_client: Client, rows: None
) -> None:
    from virtual_llms.state import get_state

    token = ApiToken.objects.get(label="gpu-box")
    ProviderSession.objects.create(pk="sess-b", token=token)

    async def hold(held: bool) -> None:
        """Bind (or release) sess-a to a live worker; this loop's connections closed."""
        state = get_state()
        try:
            if held:
                await state.presence.beat("worker-channel")  # Redis believes live workers
                await state.presence.bind("sess-a", "worker-channel", "epoch-1")
            else:
                await state.presence.release("sess-a", "worker-channel", "epoch-1")
        finally:
            await state.aclose()

    async_to_sync(hold)(True)
    try:
        page = admin_client.get("/admin/virtual_llms/providersession/").content.decode()
    finally:
        async_to_sync(hold)(False)
    assert "control stream" in page.lower()
    row = r'/providersession/([^/]+)/change/">.*?<td class="field-stream">([^<]*)</td>'
    cells = dict(re.findall(row, page))
    assert cells == {"sess-a": "connected", "sess-b": "none"}, cells


def test_revoking_while_redis_is_away_revokes_and_says_so(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25: the admin's revoke never answers 500; the database is the record, and the
    workers close the token's streams from it within a second (revocation.py)."""
    import redis

    from virtual_llms import events

    def unreachable(message: object) -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")

    monkeypatch.setattr(events, "broadcast_sync", unreachable)
    token, plaintext = token_create(role="publisher", label="box-c")
    response = admin_client.post(f"/admin/virtual_llms/apitoken/{token.pk}/revoke/", follow=True)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Revoked box-c in the database" in page
    assert "within a second" in page
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    with pytest.raises(ApiError):
        authenticate_token(plaintext)


def test_the_usage_page_shows_totals_per_token_and_model_and_a_chart(
    admin_client: Client,
) -> None:
    from datetime import timedelta

    from virtual_llms.models import UsageRecord

    token, _ = token_create(role="client", label="team-chart")
    now = timezone.now()
    for days, model, prompt in ((0, "alpha", 10), (1, "alpha", 20), (2, "beta", 5), (40, "old", 1)):
        UsageRecord.objects.create(
            token=token,
            llm_name=model,
            endpoint="/v1/chat/completions",
            status=200,
            prompt_tokens=prompt,
            completion_tokens=1,
            duration_ms=1.0,
            created_at=now - timedelta(days=days),
        )
    index = admin_client.get("/admin/").content.decode()
    assert "/admin/virtual_llms/usagerecord/" in index
    page = admin_client.get("/admin/virtual_llms/usagerecord/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="usage-chart"' in html
    assert html.count('class="usage-bar"') == 8  # each day of the last 7, today included
    assert 'class="usage-tokens"' in html
    found = re.search(r'id="usage-totals">(.*?)</p>', html, re.S)
    assert found
    totals = re.sub(r"\s+", " ", found[1])
    assert "<strong>3</strong> requests" in totals
    assert "<strong>35</strong> prompt" in totals
    table = re.search(r'id="usage-by-model">(.*?)</table>', html, re.S)
    assert table
    by_model = table[1]
    assert "<td>alpha</td><td>2</td><td>0</td><td>30</td><td>2</td>" in by_model
    assert "<td>beta</td>" in by_model
    assert "old" not in by_model
    assert "<td>team-chart</td><td>3</td>" in html
    month = admin_client.get("/admin/virtual_llms/usagerecord/?days=90").content.decode()
    assert "<td>old</td>" in month
    # Nothing to add, change or delete: records are the broker's.
    assert admin_client.get("/admin/virtual_llms/usagerecord/add/").status_code == 403

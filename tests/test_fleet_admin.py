"""The admin's Fleet page: its rows from one snapshot, the stream's worker and transport from
its epoch, the fragment htmx polls, Drain / Evict, and refusals that change nothing."""

from __future__ import annotations

import re
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone

from virtual_llms import stream_epochs
from virtual_llms.auth import token_create
from virtual_llms.models import Backend, Llm, ProviderSession, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pool() -> Llm:
    token, _ = token_create(role="publisher", label="gpu-box", owner="team-a")
    row = Llm.objects.create(
        name="pool-a",
        type="openai",
        model="m",
        kind="virtual",
        provider_session_id="sess-a",
        publisher_token=token,
        pool=True,
        last_heartbeat_at=timezone.now(),
    )
    for sid, slots in (("sess-a", 2), ("sess-b", None)):
        ProviderSession.objects.create(pk=sid, token=token)
        Backend.objects.create(
            llm=row, session_id=sid, token=token, model="m", max_concurrency=slots
        )
    return row


def hold(sid: str, epoch: str, held: bool) -> None:
    """Bind (or release) a session's stream to a live worker, as binding.py does."""
    from virtual_llms.state import get_state

    async def go() -> None:
        state = get_state()
        try:
            if held:
                await state.presence.beat("worker-channel")
                await state.presence.bind(sid, "worker-channel", epoch)
            else:
                await state.presence.release(sid, "worker-channel", epoch)
        finally:
            await state.aclose()

    async_to_sync(go)()


def backend_rows(html: str) -> dict[str, str]:
    """Each backend row's session and its cells' text, squeezed."""
    found = {}
    for sid, body in re.findall(
        r'<tr class="backend"[^>]*data-sid="([^"]+)"[^>]*>(.*?)</tr>', html, re.S
    ):
        text = re.sub(r"<[^>]+>", " ", body)
        found[sid] = " ".join(text.split())
    return found


def test_the_epoch_says_transport_worker_and_since() -> None:
    epoch = stream_epochs.new("ws")
    info = stream_epochs.parse(epoch)
    assert info is not None
    assert info.transport == "ws"
    assert " " not in epoch
    assert abs((timezone.now() - info.since).total_seconds()) < 5  # type: ignore[operator]
    assert stream_epochs.parse("0123456789abcdef") is None  # an epoch made before


def test_the_page_lists_backends_with_their_stream_and_recent_requests(
    admin_client: Client, pool: Llm
) -> None:
    epoch = stream_epochs.new("sse")
    now = timezone.now()
    UsageRecord.objects.bulk_create(
        [
            UsageRecord(
                llm_name="pool-a",
                endpoint="/v1/chat/completions",
                status=s,
                duration_ms=5,
                ttfb_ms=3,
                created_at=now,
            )
            for s in (200, 200, 502)
        ]
    )
    hold("sess-a", epoch, True)
    try:
        page = admin_client.get("/admin/fleet/")
    finally:
        hold("sess-a", epoch, False)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'hx-get="/admin/fleet/rows/"' in html
    assert "every 3s" in html
    assert "/static/django_htmx/htmx-2.min.js" in html  # vendored, no CDN
    cells = backend_rows(html)
    worker = stream_epochs.parse(epoch).worker  # type: ignore[union-attr]
    assert cells["sess-a"].startswith("sess-a gpu-box team-a active 0 / 2 " + worker + " sse")
    assert cells["sess-b"].startswith("sess-b gpu-box team-a disconnected 0 / ∞ — — —")
    head = re.search(r'<tr class="llm-head".*?</tr>', html, re.S)
    assert head is not None
    text = " ".join(re.sub(r"<[^>]+>", " ", head.group(0)).split())
    assert "in flight 0 / 2" in text
    assert "queue 0" in text
    assert "5 min: 3 req, 1 err" in text
    # The index and the sidebar of every admin page link to it.
    assert 'href="/admin/fleet/"' in admin_client.get("/admin/").content.decode()
    sidebar = admin_client.get("/admin/virtual_llms/llm/").content.decode()
    assert re.search(r'id="nav-sidebar".*href="/admin/fleet/"', sidebar, re.S)
    assert 'class="model-fleet current-model"' in html  # the page marks itself there


def test_the_fragment_is_the_rows_alone(admin_client: Client, pool: Llm) -> None:
    html = admin_client.get("/admin/fleet/rows/").content.decode()
    assert 'id="fleet-table"' in html
    assert "<html" not in html
    assert set(backend_rows(html)) == {"sess-a", "sess-b"}


def test_drain_undrain_and_evict_from_the_page(admin_client: Client, pool: Llm) -> None:
    hx = {"HX-Request": "true"}
    got = admin_client.post(
        "/admin/fleet/backend/", {"llm": "pool-a", "sid": "sess-a", "action": "drain"}, headers=hx
    )
    assert got.status_code == 200
    assert "Draining sess-a of pool-a" in got.content.decode()
    assert Backend.objects.get(session_id="sess-a").draining
    assert 'value="undrain"' in got.content.decode()
    # Without htmx: back to the page.
    got = admin_client.post(
        "/admin/fleet/backend/", {"llm": "pool-a", "sid": "sess-a", "action": "undrain"}
    )
    assert got.status_code == 302
    assert got["Location"] == "/admin/fleet/"
    assert not Backend.objects.get(session_id="sess-a").draining
    got = admin_client.post(
        "/admin/fleet/backend/", {"llm": "pool-a", "sid": "sess-b", "action": "evict"}, headers=hx
    )
    assert got.status_code == 200
    assert set(Backend.objects.values_list("session_id", flat=True)) == {"sess-a"}
    assert set(backend_rows(got.content.decode())) == {"sess-a"}


def test_bad_posts_change_nothing(admin_client: Client, pool: Llm) -> None:
    post = admin_client.post
    assert (
        post("/admin/fleet/backend/", {"llm": "pool-a", "sid": "sess-a", "action": "x"}).status_code
        == 400
    )
    assert (
        post(
            "/admin/fleet/backend/", {"llm": "pool-a", "sid": "nope", "action": "evict"}
        ).status_code
        == 404
    )
    assert (
        post(
            "/admin/fleet/backend/", {"llm": "../x", "sid": "sess-a", "action": "drain"}
        ).status_code
        == 404
    )
    assert admin_client.get("/admin/fleet/backend/").status_code == 405
    assert Backend.objects.filter(draining=False).count() == 2


def test_the_page_needs_an_admin_login_and_the_csrf_token(
    client: Client, pool: Llm, admin_user: object
) -> None:
    got = client.get("/admin/fleet/rows/", headers={"HX-Request": "true"})
    assert got["HX-Redirect"] == "/admin/login/?next=/admin/fleet/"  # htmx: the whole page
    assert "<form" not in got.content.decode()
    got = client.get("/admin/fleet/")
    assert got.status_code == 302
    assert got["Location"].startswith("/admin/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(admin_user)  # type: ignore[arg-type]
    got = strict.post(
        "/admin/fleet/backend/", {"llm": "pool-a", "sid": "sess-a", "action": "evict"}
    )
    assert got.status_code == 403
    assert Backend.objects.count() == 2


def test_a_wake_in_progress_shows_with_its_age(admin_client: Client, pool: Llm) -> None:
    import time

    from virtual_llms.state import get_state

    async def lead() -> int:
        """Take the wake's lease as wake.py's leader does."""
        state = get_state()
        try:
            since_ms = int(time.time() * 1000) - 7_000  # its request arrived 7 s ago
            joined = await state.leases.join(f"wake:{pool.pk}", "hub-x", 60_000, 0, since_ms)
            assert joined.kind == "lead"
            return joined.epoch
        finally:
            await state.aclose()

    before = admin_client.get("/admin/fleet/rows/").content.decode()
    assert "waking" not in before
    epoch = async_to_sync(lead)()
    try:
        html = admin_client.get("/admin/fleet/rows/").content.decode()
    finally:

        async def release() -> None:
            state = get_state()
            try:
                await state.leases.release(f"wake:{pool.pk}", epoch)
            finally:
                await state.aclose()

        async_to_sync(release)()
    assert re.search(r"waking for ([789]) s", html), html
    assert "waking" not in admin_client.get("/admin/fleet/rows/").content.decode()


def test_the_cost_of_a_refresh_does_not_grow_with_the_fleet(admin_client: Client) -> None:
    """Five queries and one state read per refresh, for 2 backends as for 500 (50 pools of
    10); the time of a refresh with 500 is printed."""
    import time

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from virtual_llms.state import get_state

    token, _ = token_create(role="publisher", label="rack", owner="team-r")
    sessions = [ProviderSession(pk=f"s{i:03d}", token=token) for i in range(10)]
    ProviderSession.objects.bulk_create(sessions)

    def grow(pools: int) -> None:
        """Pools of 10 backends up to ``pools`` (bulk: Llm.save() would add its own backend)."""
        have = Llm.objects.count()
        rows = Llm.objects.bulk_create(
            [
                Llm(
                    name=f"pool-{p:02d}",
                    type="openai",
                    model="m",
                    kind="virtual",
                    pool=True,
                    provider_session_id="s000",
                    publisher_token=token,
                )
                for p in range(have, pools)
            ]
        )
        Backend.objects.bulk_create(
            [
                Backend(llm=row, session=s, token=token, model="m", max_concurrency=4)
                for row in rows
                for s in sessions
            ]
        )

    state = get_state()
    calls: list[str] = []
    if state.conn is not None:  # count the Redis scripts a refresh runs
        real = state.conn.sync_script

        def counted(name: str) -> Any:
            calls.append(name)
            return real(name)

        state.conn.sync_script = counted  # type: ignore[method-assign]  # a spy, undone below
    try:
        grow(1)
        with CaptureQueriesContext(connection) as small:
            assert admin_client.get("/admin/fleet/rows/").status_code == 200
        scripts_small = list(calls)
        grow(50)
        calls.clear()
        started = time.perf_counter()
        with CaptureQueriesContext(connection) as large:
            html = admin_client.get("/admin/fleet/rows/").content.decode()
        took = time.perf_counter() - started
    finally:
        if state.conn is not None:
            del state.conn.sync_script
    assert html.count('<tr class="backend"') == 500
    fleet_queries = [
        q["sql"]
        for q in large.captured_queries
        if "django_session" not in q["sql"] and "auth_user" not in q["sql"]
    ]
    assert len(large.captured_queries) == len(small.captured_queries), fleet_queries
    assert len(fleet_queries) == 5, fleet_queries
    assert calls == scripts_small
    if state.conn is not None:
        assert calls == ["fleet_snapshot"]
    print(f"\na Fleet refresh with 500 backends: {took * 1000:.0f} ms ({connection.vendor})")

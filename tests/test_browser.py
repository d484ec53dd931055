"""The admin in a real browser: Playwright for Python driving Debian's Chromium (never a
downloaded one) against a real daphne process — log in, the LLM list, evict, a token shown
once and revoked, the Fleet page updating by itself as a backend connects, gets busy and
goes away, Drain from the page, the phone layout and dark mode, and the Usage page's chart
and totals. Screenshots are kept under a temp dir (its path is printed).

Without Chromium (or the playwright package) these tests skip and say why; under CI=true
they fail instead. On PostgreSQL + Redis when they are up (always in CI), else on the
embedded broker (SQLite, one process's state)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, Frame, chat_answer
from tests.services_up import services_up

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MCPD_TEST_CHROMIUM", "/usr/bin/chromium")
PASSWORD = f"pw-{uuid.uuid4().hex}"
# How long a page may take to show what the test waits for: the Fleet page re-reads every
# 3 s, so a change shows within one refresh and the time to render it.
SHOWS_WITHIN_MS = 8_000

T = TypeVar("T")


def _missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser tests, but {why}")
    pytest.skip(f"browser tests skipped: {why}")


class Background:
    """An event loop on a thread, for the publishers and clients the browser watches (the
    Playwright sync API wants the test's thread for itself)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(autouse=True)
def _close_state_clients() -> None:
    """conftest's async fixture, made a no-op here: this process holds no shared state (the
    broker is another process), and Playwright's sync API runs its own event loop on the
    test's thread, where pytest-asyncio's runner cannot run another."""


@pytest.fixture(scope="module")
def shots() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mcpd-browser-shots-"))
    print(f"\nbrowser screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    services = services_up()[0]
    b = Broker(1, services=services, env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD}).start()
    print(f"\nbroker: {'PostgreSQL + Redis' if services else 'embedded (SQLite)'}")
    b.manage("createsuperuser", "--noinput", "--username", "ops", "--email", "ops@example.com")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def bg() -> Iterator[Background]:
    loop = Background()
    yield loop
    loop.stop()


@pytest.fixture
def page(chromium: Any, broker: Broker) -> Iterator[Any]:
    """A logged-in admin's page at 1280 px."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=broker.url())
    context.set_default_timeout(SHOWS_WITHIN_MS)
    pg = context.new_page()
    pg.goto("/admin/login/")
    pg.fill("#id_username", "ops")
    pg.fill("#id_password", PASSWORD)
    pg.click("input[type=submit]")
    pg.wait_for_url(re.compile(r"/admin/$"))
    yield pg
    context.close()


class Box:
    """A backend from the contract (tests/contract_publisher.py) that holds each task until
    released."""

    def __init__(self, broker: Broker, name: str, slots: int = 2) -> None:
        self.broker, self.name, self.slots = broker, name, slots
        self.release = asyncio.Event()
        self.pub = ContractPublisher(broker.url(), broker.new_token("publisher", f"box-{name}"))
        self.gone = False

    async def up(self) -> None:
        got = await self.pub.register(
            [{"name": self.name, "type": "openai", "model": "m", "maxConcurrency": self.slots}]
        )
        assert got.status_code == 200, got.text
        await self.pub.connect()
        self.pub.serve(self.handle)

    async def handle(self, frame: Frame) -> None:
        if frame.get("kind") == "wake":
            await self.pub.result(frame["taskId"], 200, {})
            return
        await self.release.wait()
        await self.pub.result(frame["taskId"], 200, chat_answer("hi"))

    async def down(self) -> None:
        if not self.gone:
            self.gone = True
            await self.pub.aclose()


async def ask(broker: Broker, name: str) -> int:
    async with httpx.AsyncClient(timeout=30) as client:
        got = await client.post(
            f"{broker.url()}/v1/chat/completions",
            headers={"Authorization": f"Bearer {broker.token('client')}"},
            json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
        )
    return got.status_code


def backend_row(page: Any, sid: str) -> Any:
    return page.locator(f'#fleet-table tr.backend[data-sid="{sid}"]')


def test_login_shows_the_index_with_the_fleet_link(page: Any, shots: Path) -> None:
    assert page.locator("#mcpd-operations a", has_text="Fleet").is_visible()
    assert page.locator("#site-name").inner_text().startswith("mcpd")
    page.screenshot(path=shots / "01-index.png")


def test_the_llm_list_and_evict(page: Any, broker: Broker, bg: Background, shots: Path) -> None:
    name = f"list-{uuid.uuid4().hex[:6]}"
    box = Box(broker, name)
    bg.run(box.up())
    try:
        page.goto("/admin/virtual_llms/llm/")
        row = page.locator("#result_list tbody tr", has_text=name)
        assert row.count() == 1
        page.screenshot(path=shots / "02-llm-list.png")
        row.locator("input.action-select").check()
        page.select_option("select[name=action]", "evict")
        page.click("button[name=index]")
        page.wait_for_selector("ul.messagelist li.success")
        assert "Evicted" in page.locator("ul.messagelist").inner_text()
        assert page.locator("#result_list tbody tr", has_text=name).count() == 0
        page.screenshot(path=shots / "03-llm-evicted.png")
    finally:
        bg.run(box.down())


def test_a_new_token_is_shown_once_then_revoked(page: Any, broker: Broker, shots: Path) -> None:
    label = f"team-{uuid.uuid4().hex[:6]}"
    page.goto("/admin/virtual_llms/apitoken/add/")
    page.select_option("#id_role", "client")
    page.fill("#id_label", label)
    page.click("input[name=_save]")
    page.wait_for_selector("ul.messagelist li")
    shown = re.search(r"mcpd_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", page.content())
    assert shown, "the new token is shown once"
    plaintext = shown[0]
    page.screenshot(path=shots / "04-token-created.png")
    models = httpx.get(
        f"{broker.url()}/v1/models", headers={"Authorization": f"Bearer {plaintext}"}
    )
    assert models.status_code == 200
    page.goto("/admin/virtual_llms/apitoken/")
    assert plaintext not in page.content()  # once
    page.click(f"#result_list a:text-is('{label}')")
    page.click("form.mcpd-revoke button")
    page.wait_for_selector("ul.messagelist li.success")
    assert f"Revoked {label}." in page.locator("ul.messagelist").inner_text()
    page.screenshot(path=shots / "05-token-revoked.png")
    models = httpx.get(
        f"{broker.url()}/v1/models", headers={"Authorization": f"Bearer {plaintext}"}
    )
    assert models.status_code == 401


def test_the_fleet_page_follows_a_backend_without_a_reload(
    page: Any, chromium: Any, broker: Broker, bg: Background, shots: Path
) -> None:
    name = f"fleet-{uuid.uuid4().hex[:6]}"
    page.goto("/admin/fleet/")
    page.evaluate("window.mcpdNotReloaded = true")
    assert page.locator(f'tr.llm-head[data-llm="{name}"]').count() == 0
    box = Box(broker, name, slots=2)
    bg.run(box.up())
    asks: list[Any] = []
    try:
        sid = box.pub.session_id
        assert sid is not None
        row = backend_row(page, sid)
        row.wait_for()  # it connected: shown at the next refresh
        assert row.get_attribute("data-state") == "active"
        cells = row.inner_text()
        assert "0 / 2" in cells
        assert "sse" in cells
        assert f"box-{name}" in cells
        page.screenshot(path=shots / "06-fleet-connected.png", full_page=True)

        asks.append(bg.start(ask(broker, name)))  # the box holds it: one slot used
        page.wait_for_function(
            "sel => document.querySelector(sel)?.innerText.includes('1 / 2')",
            arg=f'#fleet-table tr.backend[data-sid="{sid}"] td.slots',
        )
        head = page.locator(f'tr.llm-head[data-llm="{name}"]')
        assert "in flight 1 / 2" in " ".join(head.inner_text().split())
        page.screenshot(path=shots / "07-fleet-busy.png", full_page=True)

        # Drain from the page: htmx posts the form and swaps the answer in.
        row.locator("button[value=drain]").click()
        page.wait_for_selector(f'#fleet-table tr.backend[data-sid="{sid}"][data-state="draining"]')
        assert "Draining" in page.locator("#fleet-rows ul.messagelist").inner_text()
        box.release.set()
        assert asks[0].result(30) == 200  # a draining backend finishes what it runs
        row.locator("button[value=undrain]").click()
        page.wait_for_selector(f'#fleet-table tr.backend[data-sid="{sid}"][data-state="active"]')

        # The phone layout (cards) and dark mode, on the same page.
        phone = chromium.new_context(
            viewport={"width": 390, "height": 844},
            base_url=broker.url(),
            color_scheme="dark",
            storage_state=page.context.storage_state(),
        )
        try:
            small = phone.new_page()
            small.goto("/admin/fleet/")
            assert not small.locator("#fleet-table thead").is_visible()  # cards, no header
            card = small.locator(f'#fleet-table tr.backend[data-sid="{sid}"]')
            box_width = card.bounding_box()["width"]
            assert box_width <= 390
            background = small.evaluate("getComputedStyle(document.body).backgroundColor")
            assert sum(int(v) for v in re.findall(r"\d+", background)[:3]) < 200, background
            small.screenshot(path=shots / "08-fleet-phone-dark.png", full_page=True)
        finally:
            phone.close()

        bg.run(box.down())  # the stream goes away: the backend is inactive, no worker holds it
        page.wait_for_selector(
            f'#fleet-table tr.backend[data-sid="{sid}"]'
            ':is([data-state="inactive"], [data-state="disconnected"])'
        )
        assert "sse" not in row.inner_text()
        page.screenshot(path=shots / "09-fleet-disconnected.png", full_page=True)
        assert page.evaluate("window.mcpdNotReloaded") is True  # all of it without a reload
    finally:
        box.release.set()
        for pending in asks:
            pending.result(30)
        bg.run(box.down())


def test_the_usage_page_shows_its_chart_and_totals(
    page: Any, broker: Broker, bg: Background, shots: Path
) -> None:
    name = f"usage-{uuid.uuid4().hex[:6]}"
    box = Box(broker, name)
    box.release.set()
    bg.run(box.up())
    try:
        assert [bg.run(ask(broker, name)) for _ in range(3)] == [200, 200, 200]
    finally:
        bg.run(box.down())
    deadline = time.monotonic() + 10  # the usage records are written every second
    while True:
        page.goto("/admin/virtual_llms/usagerecord/")
        row = page.locator("#usage-by-model tr", has_text=name)
        requests = row.locator("td").nth(1).inner_text() if row.count() == 1 else ""
        if requests == "3" or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # a flush may have written some of the three so far
    assert requests == "3"
    assert page.locator("#usage-chart rect.usage-bar").count() >= 1
    totals = page.locator("#usage-totals").inner_text()
    assert int(re.search(r"(\d+) requests", totals)[1]) >= 3  # type: ignore[index]
    page.screenshot(path=shots / "10-usage.png", full_page=True)

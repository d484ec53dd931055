"""Shared fixtures. Unit tests use the database and channel layer the settings name (SQLite +
in-memory by default; PostgreSQL + Redis in the second run of `make test`). Tests marked
``multiproc`` start real daphne processes (tests/cluster.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import pytest
from django.conf import settings

from tests.cluster import Broker, local_calls_skip_proxies
from tests.services_up import services_up

if TYPE_CHECKING:
    from virtual_llms.models import ApiToken


def pytest_configure(config: pytest.Config) -> None:
    local_calls_skip_proxies()
    # Each run of the suite gets its own Redis key space, so parallel runs never collide.
    settings.MCPD_REDIS_PREFIX = f"mcpdunit{uuid.uuid4().hex[:8]}"
    if settings.REDIS_URL:
        layer_config = cast(dict[str, object], settings.CHANNEL_LAYERS["default"]["CONFIG"])
        layer_config["prefix"] = f"{settings.MCPD_REDIS_PREFIX}:layer:"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave nothing of this run in the shared Redis."""
    if settings.REDIS_URL:
        from tests.cluster import drop_redis_keys

        drop_redis_keys(settings.REDIS_URL, settings.MCPD_REDIS_PREFIX)


# Tests that start processes of their own (brokers, agents, a browser).
PROCESS_MARKERS = ("multiproc", "browser", "fuzz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``), the tests that start
    processes run one after another on one xdist worker, as they would without it, while
    the other worker takes the in-process tests: on two cores, two sets of daphne workers
    at once would starve each other's timings."""
    for item in items:
        if any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
            item.add_marker(pytest.mark.xdist_group("processes"))


def require_services() -> None:
    """Skip without PostgreSQL + Redis, except in CI, where that is a failure."""
    ok, why = services_up()
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL + Redis tests, but: {why}")
    pytest.skip(f"needs PostgreSQL + Redis: {why}")


def on_postgres() -> bool:
    return bool(settings.DATABASES["default"]["ENGINE"].endswith("postgresql"))


@dataclass
class Tokens:
    publisher: ApiToken
    publisher_plain: str
    client: ApiToken
    client_plain: str
    admin: ApiToken
    admin_plain: str
    other_publisher: ApiToken
    other_publisher_plain: str


@pytest.fixture
def tokens(db: None) -> Tokens:
    from virtual_llms.auth import token_create

    pub, pub_plain = token_create(role="publisher", label="pub")
    cli, cli_plain = token_create(role="client", label="cli")
    adm, adm_plain = token_create(role="admin", label="adm")
    other, other_plain = token_create(role="publisher", label="other")
    return Tokens(pub, pub_plain, cli, cli_plain, adm, adm_plain, other, other_plain)


@pytest.fixture
def virtual_llm(tokens: Tokens) -> None:
    """An active virtual LLM "m1" (upstream model "up") of session "sess", whose publisher
    is ``tokens.publisher``. Tests that use it need a transactional database."""
    from django.utils import timezone

    from virtual_llms.models import Llm, ProviderSession

    ProviderSession.objects.create(pk="sess", token=tokens.publisher)
    Llm.objects.create(
        name="m1",
        type="openai",
        model="up",
        kind="virtual",
        provider_session_id="sess",
        publisher_token=tokens.publisher,
        last_heartbeat_at=timezone.now(),
    )


@pytest.fixture(autouse=True)
def _fresh_loop_state() -> Iterator[None]:
    """Every test runs in a new event loop: drop loop-bound layer and state objects."""
    from virtual_llms import events, rowcache, state, usage

    events.reset_layers()
    state.reset_state()
    rowcache.reset()
    usage.reset()
    yield
    events.reset_layers()
    state.reset_state()
    rowcache.reset()


@pytest.fixture(autouse=True)
async def _close_state_clients(_fresh_loop_state: None) -> AsyncIterator[None]:
    """Close the Redis client the test's loop made for the shared state, if it made one (any
    request to the client API makes one: the row lookup reads its stamps there)."""
    from virtual_llms import state

    yield
    current = state.current_state()
    if current is not None:
        await current.aclose()


@pytest.fixture
async def async_orm() -> AsyncIterator[None]:
    """For async tests that use the ORM: the async ORM's thread keeps its own connections;
    close them at the end so the test database can be dropped."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
async def hub(async_orm: None) -> AsyncIterator[object]:
    """This test loop's hub, stopped at the end so no background task outlives the test."""
    from virtual_llms import hub as hub_mod

    yield await hub_mod.get_hub()
    await hub_mod.stop_hub()


@pytest.fixture(scope="session")
def broker3() -> Iterator[Broker]:
    """Three daphne workers on one PostgreSQL database and one Redis."""
    require_services()
    broker = Broker(3, services=True, env={"MCPD_INFER_TIMEOUT_SECONDS": "20"}).start()
    yield broker
    broker.stop()


@pytest.fixture(params=["broker3", "embedded"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each of the two brokers in turn (black-box tests that must hold on both)."""
    from tests.contract_support import prime

    return prime(cast(Broker, request.getfixturevalue(request.param)))


@pytest.fixture(params=["sse", "ws"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each control-stream transport in turn."""
    return cast(str, request.param)


@pytest.fixture(scope="session")
def embedded() -> Iterator[Broker]:
    """One daphne process on SQLite and the in-memory channel layer."""
    broker = Broker(1, services=False, env={"MCPD_INFER_TIMEOUT_SECONDS": "20"}).start()
    yield broker
    broker.stop()

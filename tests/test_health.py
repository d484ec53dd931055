"""/healthz and /readyz (PROTOCOL.md "Health and metrics") through the ASGI app."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from virtual_llms import drain
from virtual_llms.hub import get_hub

pytestmark = pytest.mark.django_db(transaction=True)


async def test_healthz_answers_ok_without_auth() -> None:
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


async def test_readyz_is_ready_once_the_hub_runs() -> None:
    await get_hub()
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"ok": True}


async def test_readyz_answers_503_while_the_worker_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    await get_hub()
    monkeypatch.setattr(drain, "draining", True)
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ok": False, "failed": ["hub"]}


async def test_readyz_starts_the_hub_of_a_worker_nothing_used_yet() -> None:
    """A worker a load balancer has not sent a request yet is ready too: the hub starts
    on first use, and the probe is one."""
    from virtual_llms.hub import current_hub

    assert current_hub() is None
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200, response.content
    assert current_hub() is not None

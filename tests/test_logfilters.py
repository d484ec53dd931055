"""Issue 28: an answer the contract defines (404 model_not_found, 503 publisher_offline, a
refused heartbeat) is not logged again by Django at WARNING/ERROR on /api/ and /v1/; a 404
elsewhere and a 500 keep their lines."""

from __future__ import annotations

import logging

import pytest
from django.test import AsyncClient

from tests.conftest import Tokens

pytestmark = pytest.mark.django_db(transaction=True)


def django_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "django.request"]


async def test_contract_answers_are_not_logged_again_by_django(
    tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    # The async client: the requests run on the test's loop, whose Redis client the
    # suite closes (a sync Client runs each on a loop of its own, leaving its client open).
    client = AsyncClient()
    bearer = {"Authorization": f"Bearer {tokens.client_plain}"}
    with caplog.at_level(logging.INFO):
        missing = await client.post(
            "/v1/chat/completions",
            {"model": "nope", "messages": []},
            content_type="application/json",
            headers=bearer,
        )
        assert missing.status_code == 404
        heartbeat = await client.post(
            "/api/v1/virtual/heartbeat",
            {"providerSessionId": "nobody"},
            content_type="application/json",
            headers={"Authorization": f"Bearer {tokens.publisher_plain}"},
        )
        assert heartbeat.status_code == 404
        assert django_lines(caplog) == []
        assert (await client.get("/admin/no-such-page/")).status_code in (302, 404)
        assert (await client.get("/no-such-page")).status_code == 404
    assert django_lines(caplog) == ["Not Found: /no-such-page"]


def test_a_500_keeps_its_line() -> None:
    from django.http import HttpRequest

    from virtual_llms.logfilters import ContractResponses

    request = HttpRequest()
    request.path = "/v1/chat/completions"
    keep = ContractResponses()

    def record(status: int) -> logging.LogRecord:
        made = logging.LogRecord("django.request", logging.ERROR, __file__, 1, "x", (), None)
        made.status_code = status
        made.request = request
        return made

    assert keep.filter(record(500))
    assert not keep.filter(record(503))
    assert not keep.filter(record(404))
    request.path = "/admin/x"
    assert keep.filter(record(404))

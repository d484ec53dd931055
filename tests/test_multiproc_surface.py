"""First contact, black-box, on real daphne workers (issue 20): the admin is styled with no
collectstatic, the API docs load their own assets, and a publisher written with httpx-sse
(which sets ``Accept: text/event-stream`` on the headers it is given) heartbeats and reports
its status with bodies sent without a ``Content-Type``."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from httpx_sse import aconnect_sse
from openapi_spec_validator import validate

from tests.cluster import Broker
from tests.contract_support import uname

pytestmark = pytest.mark.multiproc


async def test_the_admin_and_the_api_docs_are_served_with_their_files(broker: Broker) -> None:
    async with httpx.AsyncClient(timeout=30.0) as client:
        for worker in range(broker.n):
            base = broker.url(worker)
            page = await client.get(f"{base}/admin/login/")
            assert page.status_code == 200
            sheets = re.findall(r'href="(/static/[^"]+\.css)"', page.text)
            assert "/static/admin/css/base.css" in sheets
            for sheet in sheets:
                css = await client.get(base + sheet)
                assert css.status_code == 200, sheet
                assert css.headers["content-type"].startswith("text/css")
            docs = await client.get(f"{base}/api/docs/")
            assert docs.status_code == 200
            assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', docs.text)
            assert len(assets) >= 3
            for asset in assets:
                assert (await client.get(base + asset)).status_code == 200, asset
            schema = await client.get(f"{base}/api/schema/")
            validate(schema.json())


async def test_an_httpx_sse_publisher_heartbeats_and_sets_its_status(broker: Broker) -> None:
    name = uname("sse-client")
    sid = uname("sess")
    # One headers dict for every call, as a publisher written with httpx-sse often has.
    headers = {"Authorization": f"Bearer {broker.token('publisher')}"}
    register = {
        "providerSessionId": sid,
        "providers": [{"name": name, "type": "openai", "model": "m"}],
    }
    async with httpx.AsyncClient(timeout=30.0) as client:
        base = broker.url(0)
        # No Content-Type: the body is JSON all the same.
        answer = await client.post(
            f"{base}/api/v1/virtual/register", content=json.dumps(register), headers=headers
        )
        assert answer.status_code == 200, answer.text
        url = f"{base}/api/v1/virtual/sessions/{sid}/stream"
        async with aconnect_sse(client, "GET", url, headers=headers) as source:
            events = source.aiter_sse()
            assert (await anext(events)).event == "ready"
            assert headers["Accept"] == "text/event-stream"  # what httpx-sse did to them
            for worker in range(broker.n):
                beat = await client.post(
                    f"{broker.url(worker)}/api/v1/virtual/heartbeat",
                    content=json.dumps({"providerSessionId": sid}),
                    headers=headers,
                )
                assert beat.status_code == 200, beat.text
                assert beat.headers["content-type"] == "application/json"
                assert beat.json() == {"ok": True, "llms": 1}
            status = await client.post(
                f"{broker.url(1)}/api/v1/virtual/status",
                content=json.dumps(
                    {"providerSessionId": sid, "llmName": name, "status": "hibernating"}
                ),
                headers=headers,
            )
            assert status.status_code == 200, status.text
            assert status.json()["status"] == "hibernating"
            not_json = await client.post(
                f"{base}/api/v1/virtual/heartbeat", content=b"providerSessionId=x", headers=headers
            )
            assert not_json.status_code == 400
            assert not_json.json()["error"]["code"] == "invalid_json"

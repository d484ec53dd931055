"""First contact, black-box, on real daphne workers (issue 20): the admin is styled with no
collectstatic, the API docs load their own assets, a publisher written with httpx-sse
(which sets ``Accept: text/event-stream`` on the headers it is given) heartbeats and reports
its status with bodies sent without a ``Content-Type``, and the OpenAI SDK's
``models.retrieve`` and ``responses.create`` (streamed and not) work."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse
from openapi_spec_validator import validate

from tests.cluster import Broker
from tests.contract_support import provider, publisher, sdk, sdk_error_code, uname

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


# --- the OpenAI SDK's first calls: models.retrieve, responses ---------------------------------


async def test_models_retrieve_with_the_sdk(broker: Broker) -> None:
    name = f"{uname('team')}/qwen2.5:7b"  # "/" and ":" are allowed in names
    async with publisher(broker, "sse", [provider(name)]):
        for worker in range(broker.n):
            async with sdk(broker, worker=worker) as client:
                model = await client.models.retrieve(name)
                assert (model.id, model.object, model.owned_by) == (name, "model", "mcpd:virtual")
                listed = {m.id: m for m in (await client.models.list()).data}
                assert listed[name].created == model.created
                with pytest.raises(openai.NotFoundError) as missing:
                    await client.models.retrieve(f"{name}-nope")
                assert sdk_error_code(missing.value) == "model_not_found"


def _response(text: str) -> dict[str, Any]:
    """A minimal Responses API ``response`` object the SDK parses."""
    return {
        "id": "resp_test",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "m",
        "output": [
            {
                "type": "message",
                "id": "msg_test",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


async def test_responses_with_the_sdk_streamed_and_not(broker: Broker) -> None:
    name = uname("responses")
    async with (
        publisher(broker, "sse", [provider(name, model="up-resp")]) as pub,
        sdk(broker) as client,
    ):
        call = asyncio.create_task(client.responses.create(model=name, input="Hi"))
        frame = await pub.next_frame("infer")
        assert frame["endpoint"] == "/v1/responses"
        assert frame["body"] == {"model": "up-resp", "input": "Hi"}
        posted = await pub.result(frame["taskId"], 200, _response("Hello!"), url=broker.url(2))
        assert posted.status_code == 204
        answer = await asyncio.wait_for(call, 10.0)
        assert answer.output_text == "Hello!"

        async def consume() -> list[str]:
            stream = await client.responses.create(model=name, input="Hi", stream=True)
            return [event.type async for event in stream]

        streamed = asyncio.create_task(consume())
        frame = await pub.next_frame("infer")
        assert frame["endpoint"] == "/v1/responses"
        assert frame["streaming"] is True
        delta = {
            "type": "response.output_text.delta",
            "item_id": "msg_test",
            "output_index": 0,
            "content_index": 0,
            "delta": "Hel",
            "sequence_number": 1,
        }
        done = {"type": "response.completed", "response": _response("Hel"), "sequence_number": 2}
        chunks = [{"data": json.dumps(delta)}, {"data": json.dumps(done)}]
        posted = await pub.chunks(
            frame["taskId"], [*chunks, {"data": "[DONE]", "done": True}], url=broker.url(1)
        )
        assert posted.status_code == 204
        assert await asyncio.wait_for(streamed, 10.0) == [
            "response.output_text.delta",
            "response.completed",
        ]

"""The OpenAPI document (GET /api/schema/) and its page (GET /api/docs/), through the ASGI app:
a valid OpenAPI 3 document describing every route of mcpd_site/urls.py, generated with no
warning, and a page whose assets are served by the broker itself."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.test import override_settings
from django.urls import URLPattern, path
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.management.commands.spectacular import SchemaGenerationError
from openapi_spec_validator import validate

from mcpd_site import asgi
from mcpd_site import urls as site_urls
from tests.test_static import _get
from virtual_llms import edge, openapi

SCHEMA = "/api/schema/"
NOT_DESCRIBED = {"/admin/", SCHEMA, "/api/docs/"}


def _openapi_path(pattern: URLPattern) -> str:
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern))


async def _document(query: str = "", *headers: tuple[bytes, bytes]) -> tuple[dict[str, str], bytes]:
    status, head, body = await _get(asgi.application, SCHEMA + query, *headers)
    assert status == 200, body[:300]
    return head, body


async def test_the_document_is_valid_openapi_and_describes_every_route() -> None:
    head, body = await _document()
    assert head["content-type"].startswith("application/vnd.oai.openapi+json")
    document = json.loads(body)
    validate(document)  # openapi-spec-validator: raises on any error
    assert document["openapi"].startswith("3.")
    routes = {
        _openapi_path(p)
        for p in site_urls.urlpatterns
        if isinstance(p, URLPattern) and p.callback is not edge.no_route  # the JSON 404
    } - NOT_DESCRIBED
    routes = {r for r in routes if not r.startswith("/admin/")}  # the admin's HTML pages
    assert len(routes) >= 17
    assert routes <= set(document["paths"])
    tags = [tag["name"] for tag in document["tags"]]
    assert tags[0] == "OpenAI-compatible"
    for route in routes:
        operations = document["paths"][route]
        assert operations, route
        for operation in operations.values():
            assert operation["summary"], route
            assert len(operation["tags"]) == 1, route
            assert set(operation["tags"]) <= set(tags), route
            assert (
                "200" in operation["responses"]
                or "201" in operation["responses"]
                or ("204" in operation["responses"])
            )
    # What a client generator needs: OpenAI's operation ids, the bearer scheme, both shapes.
    assert document["paths"]["/v1/models/{name}"]["get"]["operationId"] == "retrieveModel"
    assert document["paths"]["/v1/responses"]["post"]["operationId"] == "createResponse"
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["security"] == [{"bearerAuth": []}]
    assert chat["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    register = document["paths"]["/api/v1/virtual/register"]["post"]
    assert register["responses"]["409"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ApiError"
    }
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert document["paths"]["/healthz"]["get"]["security"] == [{}]


async def test_json_yaml_and_any_accept() -> None:
    _, as_json = await _document("?format=json")
    document = json.loads(as_json)
    head, as_yaml = await _document("?format=yaml")
    assert head["content-type"].startswith("application/vnd.oai.openapi")
    assert yaml.safe_load(as_yaml) == document
    head, body = await _document("", (b"accept", b"text/event-stream"))
    assert json.loads(body) == document  # the lenient rule: never 406
    head, body = await _document("", (b"accept", b"application/json"))
    assert head["content-type"].startswith("application/json")
    assert json.loads(body) == document
    assert openapi.document.cache_info().misses == 1  # made once per process


def test_the_generator_warns_about_nothing(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert yaml.safe_load(out.read_text())["paths"]


async def _undescribed(request: Any) -> Any:
    raise AssertionError("never called")


urlpatterns = [*site_urls.urlpatterns, path("v1/undescribed", _undescribed)]


def test_a_plain_route_with_no_description_is_a_warning(tmp_path: Path) -> None:
    with (
        override_settings(ROOT_URLCONF="tests.test_openapi"),
        pytest.raises(SchemaGenerationError, match="due to warnings"),
    ):
        call_command("spectacular", "--fail-on-warn", "--file", str(tmp_path / "s.yaml"))
    GENERATOR_STATS.reset()


async def test_the_docs_page_is_served_with_its_own_assets() -> None:
    status, head, page = await _get(asgi.application, "/api/docs/", (b"accept", b"text/html"))
    assert status == 200
    assert head["content-type"].startswith("text/html")
    html = page.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 3  # Swagger UI's CSS, its two scripts (and the favicon)
    for asset in assets:
        assert asset.startswith("/static/drf_spectacular_sidecar/"), asset
        status, _, body = await _get(asgi.application, asset)
        assert status == 200, asset
        assert body
    assert '"/api/schema/"' in html or "'/api/schema/'" in html
    assert "cdn" not in html.lower()

"""JSON endpoints. Thin: parse, call one service, render.

The registry endpoints are DRF views (quick, sync). The task-result endpoints sit on the
relay's hot path, so they are plain async views: no thread hop but the one token lookup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import relay, selectors, services
from .auth import ADMIN_ROLES, CLIENT_ROLES, PUBLISHER_ROLES, aauthenticate
from .errors import ApiError
from .http import json_view, read_json_object
from .models import ApiToken, Llm
from .serializers import (
    HeartbeatSerializer,
    LlmSerializer,
    PublicLlmCreateSerializer,
    RegisterSerializer,
    StatusSerializer,
)


def _token(request: Request) -> ApiToken:
    assert isinstance(request.auth, ApiToken)  # HasRole ran first
    return request.auth


def _validated(serializer_class: Any, request: Request) -> dict[str, Any]:
    if not isinstance(request.data, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class RegisterView(APIView):
    roles = PUBLISHER_ROLES

    def post(self, request: Request) -> Response:
        data = _validated(RegisterSerializer, request)
        specs = [services.ProviderSpec(**p) for p in data["providers"]]
        sid, rows = services.llm_register(
            token=_token(request), session_id=data["providerSessionId"], providers=specs
        )
        return Response({"providerSessionId": sid, "llms": LlmSerializer(rows, many=True).data})


class HeartbeatView(APIView):
    roles = PUBLISHER_ROLES

    def post(self, request: Request) -> Response:
        data = _validated(HeartbeatSerializer, request)
        count = services.llm_heartbeat(token=_token(request), session_id=data["providerSessionId"])
        return Response({"ok": True, "llms": count})


class StatusView(APIView):
    roles = PUBLISHER_ROLES

    def post(self, request: Request) -> Response:
        data = _validated(StatusSerializer, request)
        row = services.llm_set_status(
            token=_token(request),
            session_id=data["providerSessionId"],
            llm_name=data["llmName"],
            status=data["status"],
        )
        return Response(LlmSerializer(row).data)


class LlmListView(APIView):
    @property
    def roles(self) -> tuple[str, ...]:
        return ADMIN_ROLES if self.request.method == "POST" else CLIENT_ROLES

    def get(self, request: Request) -> Response:
        return Response(LlmSerializer(selectors.llm_list(), many=True).data)

    def post(self, request: Request) -> Response:
        data = _validated(PublicLlmCreateSerializer, request)
        row = services.llm_create_public(
            name=data["name"],
            type=data["type"],
            model=data["model"],
            url=data["url"],
            tier=data["tier"],
            description=data["description"],
            api_key=data["apiKey"],
        )
        return Response(LlmSerializer(row).data, status=201)


class LlmDetailView(APIView):
    @property
    def roles(self) -> tuple[str, ...]:
        return ADMIN_ROLES if self.request.method == "DELETE" else CLIENT_ROLES

    def _row(self, name: str) -> Llm:
        row = selectors.llm_get(name=name)
        if row is None:
            raise ApiError(404, "llm_not_found", f"No LLM named '{name}'.")
        return row

    def get(self, request: Request, name: str) -> Response:
        return Response(LlmSerializer(self._row(name)).data)

    def delete(self, request: Request, name: str) -> Response:
        services.llm_evict(llm=self._row(name))
        return Response(status=204)


# --- task results: plain async views on the hot path ---------------------------------------

TaskHandler = Callable[[int, str, dict[str, Any]], Awaitable[bool]]


def _task_endpoint(handler: TaskHandler) -> Any:
    @json_view("POST")
    async def view(request: HttpRequest, task_id: str) -> HttpResponse:
        token = await aauthenticate(request.headers.get("Authorization"), PUBLISHER_ROLES)
        body = read_json_object(request)
        if not await handler(token.pk, task_id, body):
            raise ApiError(404, "task_not_found", "No open task with this id for this publisher.")
        return HttpResponse(status=204)

    return view


def parse_result(body: dict[str, Any]) -> tuple[int, Any]:
    status = body.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ApiError(400, "invalid_request", "'status' must be an HTTP status (100-599).")
    if "body" not in body:
        raise ApiError(400, "invalid_request", "'body' is required (any JSON value).")
    return status, body["body"]


def parse_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = body.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise ApiError(400, "invalid_request", "'chunks' must be a non-empty list.")
    clean = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("data"), str):
            raise ApiError(400, "invalid_request", "Each chunk needs a string 'data'.")
        done = chunk.get("done", False)
        if not isinstance(done, bool):
            raise ApiError(400, "invalid_request", "A chunk's 'done' must be a boolean.")
        clean.append({"data": chunk["data"], "done": done})
    return clean


def parse_error(body: dict[str, Any]) -> str:
    message = body.get("error")
    if not isinstance(message, str) or not message:
        raise ApiError(400, "invalid_request", "'error' must be a non-empty string.")
    return message[:4000]


async def _result(token_id: int, task_id: str, body: dict[str, Any]) -> bool:
    status, payload = parse_result(body)
    return await relay.post_result(token_id=token_id, task_id=task_id, status=status, body=payload)


async def _chunks(token_id: int, task_id: str, body: dict[str, Any]) -> bool:
    return await relay.post_chunks(token_id=token_id, task_id=task_id, chunks=parse_chunks(body))


async def _error(token_id: int, task_id: str, body: dict[str, Any]) -> bool:
    return await relay.post_error(token_id=token_id, task_id=task_id, message=parse_error(body))


task_result = _task_endpoint(_result)
task_chunks = _task_endpoint(_chunks)
task_error = _task_endpoint(_error)

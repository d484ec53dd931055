"""JSON endpoints. Thin: parse, call one service, render.

The registry endpoints are DRF views (quick, sync). The task-result endpoints sit on the
relay's hot path, so they are plain async views: no thread hop but the one token lookup;
what they do with an answer is answers.py's, shared with the control socket.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import answers, backends, selectors, services, usage
from .auth import ADMIN_ROLES, CLIENT_ROLES, PUBLISHER_ROLES, aauthenticate
from .errors import ApiError
from .http import json_view, read_json_object
from .models import ApiToken, Llm, LlmKind, Role
from .openapi import (
    TAG_PUBLISHER,
    TAG_REST,
    USAGE_PARAMETERS,
    BackendSerializer,
    HeartbeatResponseSerializer,
    LlmDetailSerializer,
    RegisterResponseSerializer,
    UsageSerializer,
    api_errors,
)
from .protocol import AnswerKind
from .serializers import (
    DrainSerializer,
    HeartbeatSerializer,
    LlmSerializer,
    PublicLlmCreateSerializer,
    RegisterSerializer,
    StatusSerializer,
)

# GET /api/v1/llms?limit=: the largest page (issue 29: 10,240 rows were 6.2 MB at once).
PAGE_MAX = 1000


def _token(request: Request) -> ApiToken:
    assert isinstance(request.auth, ApiToken)  # HasRole ran first
    return request.auth


def _validated(
    serializer_class: Any, request: Request, *, empty: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The body, checked by the serializer; ``empty``: what an empty body means (else 400).
    Read as every JSON endpoint reads it (http.read_json: 413 past the size, checked before
    Django's RequestDataTooBig could answer its HTML 400; the depth; any Content-Type)."""
    body = read_json_object(request._request, empty=empty)
    serializer = serializer_class(data=body)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class RegisterView(APIView):
    roles = PUBLISHER_ROLES

    @extend_schema(
        operation_id="register",
        summary="Register a session's LLMs",
        tags=[TAG_PUBLISHER],
        request=RegisterSerializer,
        responses={200: RegisterResponseSerializer, **api_errors(400, 401, 403, 409, 413)},
    )
    def post(self, request: Request) -> Response:
        data = _validated(RegisterSerializer, request)
        specs = [services.ProviderSpec(**p) for p in data["providers"]]
        sid, rows = services.llm_register(
            token=_token(request), session_id=data["providerSessionId"], providers=specs
        )
        return Response({"providerSessionId": sid, "llms": LlmSerializer(rows, many=True).data})


class HeartbeatView(APIView):
    roles = PUBLISHER_ROLES

    @extend_schema(
        operation_id="heartbeat",
        summary="A session's heartbeat",
        tags=[TAG_PUBLISHER],
        request=HeartbeatSerializer,
        responses={200: HeartbeatResponseSerializer, **api_errors(400, 401, 403, 404)},
    )
    def post(self, request: Request) -> Response:
        data = _validated(HeartbeatSerializer, request)
        count = services.llm_heartbeat(token=_token(request), session_id=data["providerSessionId"])
        return Response({"ok": True, "llms": count})


class StatusView(APIView):
    roles = PUBLISHER_ROLES

    @extend_schema(
        operation_id="setStatus",
        summary="An LLM went to sleep or woke",
        tags=[TAG_PUBLISHER],
        request=StatusSerializer,
        responses={200: LlmSerializer, **api_errors(400, 401, 403, 404)},
    )
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

    @extend_schema(
        operation_id="listLlms",
        summary="Every LLM row",
        tags=[TAG_REST],
        parameters=[
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": PAGE_MAX},
                description=f"at most this many rows (1-{PAGE_MAX}), in name order; a "
                'Link header (rel="next") names the next page',
            ),
            OpenApiParameter("after", str, description="rows whose name sorts after this"),
        ],
        responses={200: LlmSerializer(many=True), **api_errors(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        rows = selectors.llm_list()
        after = request.query_params.get("after")
        if after:
            rows = rows.filter(name__gt=after)
        raw = request.query_params.get("limit")
        if raw is None:  # v1: every row
            return Response(LlmSerializer(rows, many=True).data)
        if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
            raise ApiError(400, "invalid_request", f"'limit' must be 1-{PAGE_MAX}.")
        limit = int(raw)
        page = list(rows[: limit + 1])
        response = Response(LlmSerializer(page[:limit], many=True).data)
        if len(page) > limit:
            query = urlencode({"limit": limit, "after": page[limit - 1].name})
            response["Link"] = f'<{request.path}?{query}>; rel="next"'
        return response

    @extend_schema(
        operation_id="createPublicLlm",
        summary="Create a public LLM (admin)",
        tags=[TAG_REST],
        request=PublicLlmCreateSerializer,
        responses={201: LlmSerializer, **api_errors(400, 401, 403, 409, 413)},
    )
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


_NAME = OpenApiParameter(
    "name", str, OpenApiParameter.PATH, description="The LLM's name; it may hold `/` and `:`."
)


def _row(name: str) -> Llm:
    row = selectors.llm_get(name=name)
    if row is None:
        raise ApiError(404, "llm_not_found", f"No LLM named '{name}'.")
    return row


class LlmDetailView(APIView):
    @property
    def roles(self) -> tuple[str, ...]:
        if self.request.method == "DELETE":
            return ADMIN_ROLES
        # v1.1: a publisher may read a row too, and sees its own sessions' backends only.
        return (*CLIENT_ROLES, *PUBLISHER_ROLES)

    def _row(self, name: str) -> Llm:
        return _row(name)

    @extend_schema(
        operation_id="retrieveLlm",
        summary="One LLM row, with its backends",
        tags=[TAG_REST],
        parameters=[_NAME],
        responses={200: LlmDetailSerializer, **api_errors(401, 403, 404)},
    )
    def get(self, request: Request, name: str) -> Response:
        row = self._row(name)
        data = dict(LlmSerializer(row).data)
        if row.kind == LlmKind.VIRTUAL:
            token = _token(request)
            mine = token.pk if token.role == Role.PUBLISHER else None
            data["backends"] = selectors.backends_json(row, token_id=mine)
        return Response(data)

    @extend_schema(
        operation_id="evictLlm",
        summary="Evict an LLM row (admin)",
        tags=[TAG_REST],
        parameters=[_NAME],
        responses={204: None, **api_errors(401, 403, 404)},
    )
    def delete(self, request: Request, name: str) -> Response:
        services.llm_evict(llm=self._row(name))
        return Response(status=204)


class BackendDrainView(APIView):
    """``POST /api/v1/llms/<name>/backends/<session>/drain`` (admin): the backend gets no
    new task and finishes the ones it has; ``{"draining": false}`` ends the drain."""

    roles = ADMIN_ROLES

    @extend_schema(
        operation_id="drainBackend",
        summary="Drain a backend, or end its drain (admin)",
        tags=[TAG_REST],
        parameters=[_NAME, OpenApiParameter("session_id", str, OpenApiParameter.PATH)],
        request=DrainSerializer,
        responses={200: BackendSerializer, **api_errors(400, 401, 403, 404)},
    )
    def post(self, request: Request, name: str, session_id: str) -> Response:
        data = _validated(DrainSerializer, request, empty={"draining": True})
        backend = backends.backend_get(name=name, session_id=session_id)
        backends.backend_set_draining(backend=backend, draining=data["draining"])
        return Response(selectors.backend_json(backend))


# --- usage (PROTOCOL.md "Client limits and usage") -------------------------------------------

# The default period of /api/v1/usage: the last day.
USAGE_DEFAULT_PERIOD = timedelta(hours=24)


def _instant(request: Request, name: str, default: datetime) -> datetime:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse_datetime(raw)
        if value is None:
            day = parse_date(raw)
            value = datetime(day.year, day.month, day.day) if day else None
    except ValueError:
        value = None
    if value is None:
        raise ApiError(400, "invalid_request", f"'{name}' must be an ISO 8601 date or time.")
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


def _period(request: Request) -> tuple[datetime, datetime]:
    until = _instant(request, "until", timezone.now())
    try:
        default_since = until - USAGE_DEFAULT_PERIOD
    except OverflowError:  # an until within a day of year 1 (found by schemathesis)
        default_since = datetime.min.replace(tzinfo=UTC)
    since = _instant(request, "since", default_since)
    if since > until:
        raise ApiError(400, "invalid_request", "'since' must not be after 'until'.")
    return since, until


def _usage_body(
    since: datetime, until: datetime, group_by: str, rows: list[usage.UsageRow]
) -> dict[str, Any]:
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "groupBy": group_by,
        "rows": [row.as_json() for row in rows],
    }


class UsageView(APIView):
    roles = ADMIN_ROLES

    @extend_schema(
        operation_id="usage",
        summary="Usage per token, model or day (admin)",
        tags=[TAG_REST],
        parameters=[
            *USAGE_PARAMETERS,
            OpenApiParameter("groupBy", str, enum=["token", "model", "day"]),
        ],
        responses={200: UsageSerializer, **api_errors(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        since, until = _period(request)
        group_by = request.query_params.get("groupBy") or "token"
        if group_by not in usage.GROUPS:
            raise ApiError(
                400, "invalid_request", f"'groupBy' must be one of {', '.join(usage.GROUPS)}."
            )
        return Response(_usage_body(since, until, group_by, usage.summary(since, until, group_by)))


class UsageMeView(APIView):
    roles = CLIENT_ROLES

    @extend_schema(
        operation_id="usageMe",
        summary="This client token's own usage",
        tags=[TAG_REST],
        parameters=USAGE_PARAMETERS,
        responses={200: UsageSerializer, **api_errors(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        since, until = _period(request)
        rows = usage.summary(since, until, "token", token=_token(request))
        return Response(_usage_body(since, until, "token", rows))


# --- task results: plain async views on the hot path ---------------------------------------


def _task_endpoint(kind: AnswerKind) -> Any:
    @json_view("POST")
    async def view(request: HttpRequest, task_id: str) -> HttpResponse:
        token = await aauthenticate(request.headers.get("Authorization"), PUBLISHER_ROLES)
        await answers.answer(
            kind, token_id=token.pk, task_id=task_id, body=read_json_object(request)
        )
        return HttpResponse(status=204)

    return view


task_result = _task_endpoint("result")
task_chunks = _task_endpoint("chunks")
task_error = _task_endpoint("error")

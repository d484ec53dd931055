"""The OpenAPI 3 document (``GET /api/schema/``) and its page (``GET /api/docs/``).

drf-spectacular describes the DRF views from their serializers and ``extend_schema``
(views.py). The plain async views (the OpenAI-compatible API, the publisher's control stream
and task results, health) are not DRF views, so its URL walk skips them: each is described
here by a stand-in ``APIView`` that is never served, and :func:`add_plain_views` (a
preprocessing hook, SPECTACULAR_SETTINGS) adds it at the plain view's route. A plain route
with no description is a warning of the generator, and a failing test. The relayed
endpoints are described from ``inference.ENDPOINTS``: a new one is documented with no line
here. The publisher's WebSocket is in the document's description (SPECTACULAR_SETTINGS:
OpenAPI has no words for it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.urls import URLPattern, get_resolver
from drf_spectacular.drainage import warn
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.generators import EndpointEnumerator, SchemaGenerator
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import edge, inference
from .drf import Negotiated
from .errors import ApiError
from .models import LlmStatus
from .serializers import LlmSerializer

Endpoint = tuple[str, str, str, Callable[..., Any]]

TAG_OPENAI = "OpenAI-compatible"
TAG_PUBLISHER = "Publisher"
TAG_REST = "LLM rows"
TAG_HEALTH = "Health"


# drf-spectacular registers an extension as it is subclassed; its __init_subclass__ is
# untyped, which only --strict (the app's check) reports.
class BearerTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call,unused-ignore]
    """The bearer token of :class:`virtual_llms.drf.BearerTokenAuthentication`."""

    target_class = "virtual_llms.drf.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Bearer"
        )


# --- shapes --------------------------------------------------------------------------------


class _ApiErrorBody(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="snake_case, e.g. `unauthorized`, `invalid_json`")
    message = serializers.CharField()


class ApiErrorSerializer(serializers.Serializer[Any]):
    """An error on /api/."""

    error = _ApiErrorBody()


class _OpenAIErrorBody(serializers.Serializer[Any]):
    message = serializers.CharField()
    type = serializers.CharField(help_text="e.g. `invalid_request_error`, `api_error`")
    code = serializers.CharField(allow_null=True, help_text="e.g. `model_not_found`")


class OpenAIErrorSerializer(serializers.Serializer[Any]):
    """An error on /v1/, in OpenAI's shape."""

    error = _OpenAIErrorBody()


# A Serializer class cannot declare a field called "errors" (its own property).
UsageRowSerializer = inline_serializer(
    name="UsageRow",
    fields={
        "key": serializers.CharField(help_text="the token's label, the LLM's name or the day"),
        "requests": serializers.IntegerField(),
        "errors": serializers.IntegerField(help_text="answers with a status of 400 and up"),
        "promptTokens": serializers.IntegerField(),
        "completionTokens": serializers.IntegerField(),
    },
)


class UsageSerializer(serializers.Serializer[Any]):
    """``GET /api/v1/usage`` and ``/api/v1/usage/me`` (views.UsageView)."""

    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    groupBy = serializers.ChoiceField(choices=["token", "model", "day"])
    rows = serializers.ListField(child=UsageRowSerializer)


USAGE_PARAMETERS = [
    OpenApiParameter(
        "since", OpenApiTypes.DATETIME, description="ISO 8601; default: 24 h before until"
    ),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="ISO 8601; default: now"),
]


class BackendSerializer(serializers.Serializer[Any]):
    """One publisher session serving a virtual row (serializers.backend_json)."""

    providerSessionId = serializers.CharField()
    model = serializers.CharField()
    status = serializers.ChoiceField(choices=LlmStatus.choices)
    maxConcurrency = serializers.IntegerField()
    inFlight = serializers.IntegerField(help_text="tasks in flight now, across workers")
    lastHeartbeatAt = serializers.DateTimeField(allow_null=True)
    inactiveSince = serializers.DateTimeField(allow_null=True)
    draining = serializers.BooleanField()


class LlmDetailSerializer(LlmSerializer):
    """A row as ``GET /api/v1/llms/<name>`` shows it: a virtual one with its backends (a
    publisher sees its own sessions' only)."""

    backends = BackendSerializer(many=True, required=False)

    class Meta(LlmSerializer.Meta):
        fields = [*LlmSerializer.Meta.fields, "backends"]
        read_only_fields = fields


class RegisterResponseSerializer(serializers.Serializer[Any]):
    providerSessionId = serializers.CharField()
    llms = LlmSerializer(many=True)


class HeartbeatResponseSerializer(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    llms = serializers.IntegerField(help_text="rows of the session")


class ModelSerializer(serializers.Serializer[Any]):
    """An OpenAI model object."""

    id = serializers.CharField(help_text="the LLM's name")
    object = serializers.ChoiceField(choices=["model"])
    created = serializers.IntegerField(help_text="Unix time")
    owned_by = serializers.CharField(help_text="`mcpd:virtual` or `mcpd:public`")


# A field named "data" cannot be declared on a Serializer class (it is the property).
ModelListSerializer = inline_serializer(
    "ModelList",
    fields={
        "object": serializers.ChoiceField(choices=["list"]),
        "data": ModelSerializer(many=True),
    },
)


class RelayedRequestSerializer(serializers.Serializer[Any]):
    """The OpenAI request body, relayed as it is; only ``model`` and ``stream`` are read."""

    model = serializers.CharField(
        min_length=1, max_length=128, help_text="the LLM's name (`GET /v1/models`)"
    )
    stream = serializers.BooleanField(required=False, help_text="answer as an event stream")


class TaskAnswerSerializer(serializers.Serializer[Any]):
    """The publisher's answer to a task (PROTOCOL.md, "Answering a task")."""

    status = serializers.IntegerField(required=False)


class HealthSerializer(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    failed = serializers.ListField(child=serializers.CharField(), required=False)


_WHY = {
    400: "The body is not JSON (`invalid_json`) or not a valid request.",
    401: "Missing, unknown or revoked token.",
    403: "The token's role may not do this, or the session is another publisher's.",
    404: "No such model, row, session or task.",
    405: "Another method.",
    409: "A name taken by another publisher or by a public row.",
    413: "The body is larger than MCPD_MAX_BODY_BYTES.",
    429: "A client rate limit (`rate_limit_exceeded`); see `Retry-After`.",
    502: "The publisher or the public upstream failed.",
    503: "The publisher is offline, the queue is full, or a service is away; see `Retry-After`.",
    504: "No answer in time (MCPD_INFER_TIMEOUT_SECONDS, MCPD_WAKE_TIMEOUT_SECONDS).",
}


def api_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """The /api/ error responses of these statuses."""
    return {
        status: OpenApiResponse(ApiErrorSerializer, description=_WHY[status]) for status in statuses
    }


def openai_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """The /v1/ error responses of these statuses."""
    return {
        status: OpenApiResponse(OpenAIErrorSerializer, description=_WHY[status])
        for status in statuses
    }


# --- the plain async views, described ------------------------------------------------------


def _described(name: str, method: str, *, public: bool = False, **schema: Any) -> type[APIView]:
    """A stand-in APIView for one plain view: ``extend_schema(**schema)`` on ``method``."""

    def handler(self: APIView, request: Request, *args: Any, **kwargs: Any) -> Response:
        raise NotImplementedError("describes a plain view in the OpenAPI document only")

    attrs: dict[str, Any] = {method: extend_schema(**schema)(handler), "__doc__": None}
    if public:
        attrs |= {"authentication_classes": [], "permission_classes": [AllowAny]}
    return type(name, (APIView,), attrs)


_OPENAI_NAMES = {
    "/v1/chat/completions": ("createChatCompletion", "Chat completion"),
    "/v1/completions": ("createCompletion", "Text completion"),
    "/v1/embeddings": ("createEmbedding", "Embeddings"),
    "/v1/responses": ("createResponse", "Response (OpenAI's Responses API)"),
}


def _relayed(endpoint: str) -> type[APIView]:
    operation_id, summary = _OPENAI_NAMES.get(endpoint, (None, f"POST {endpoint}"))
    return _described(
        f"Relayed{endpoint.replace('/', '_')}",
        "post",
        operation_id=operation_id,
        summary=summary,
        description=(
            f"Relayed to the model's publisher (or proxied to a public row's upstream) as "
            f"`{endpoint}`; the answer is the upstream's, passed through. With "
            f'`"stream": true` it is an event stream (`data: {{...}}` lines, then '
            f"`data: [DONE]`)."
        ),
        tags=[TAG_OPENAI],
        request=RelayedRequestSerializer,
        responses={
            (200, "application/json"): OpenApiResponse(
                OpenApiTypes.OBJECT, description="The upstream's answer."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR, description='With `"stream": true`.'
            ),
            **openai_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
        },
    )


_TASK_ID = OpenApiParameter("task_id", str, OpenApiParameter.PATH, description="the `taskId`")
_TASK_ANSWERS = {
    "result": "The whole answer of a task that does not stream.",
    "chunks": "A batch of chunks of a streamed answer (the last one says it is done).",
    "error": "The task failed; the client gets this status and error.",
}

PLAIN: dict[str, type[APIView]] = {
    **{endpoint: _relayed(endpoint) for endpoint in inference.ENDPOINTS},
    "/v1/models": _described(
        "ModelList",
        "get",
        operation_id="listModels",
        summary="The models a client may call",
        tags=[TAG_OPENAI],
        responses={200: ModelListSerializer, **openai_errors(401, 403)},
    ),
    "/v1/models/{name}": _described(
        "ModelRetrieve",
        "get",
        operation_id="retrieveModel",
        summary="One model",
        tags=[TAG_OPENAI],
        parameters=[
            OpenApiParameter(
                "name",
                str,
                OpenApiParameter.PATH,
                description="The LLM's name; it may hold `/` and `:`, sent as they are.",
            )
        ],
        responses={200: ModelSerializer, **openai_errors(401, 403, 404)},
    ),
    **{
        f"/api/v1/virtual/tasks/{{task_id}}/{kind}": _described(
            f"Task{kind.title()}",
            "post",
            operation_id=f"postTask{kind.title()}",
            summary=summary,
            tags=[TAG_PUBLISHER],
            parameters=[_TASK_ID],
            request=TaskAnswerSerializer,
            responses={204: None, **api_errors(400, 401, 403, 404, 413)},
        )
        for kind, summary in _TASK_ANSWERS.items()
    },
    "/api/v1/virtual/sessions/{session_id}/stream": _described(
        "ControlStream",
        "get",
        operation_id="controlStream",
        summary="The publisher's control stream (SSE)",
        description=(
            "`event: ready`, then one `event: task` per task (its `id:` is the task id), "
            "`event: cancel` when a client leaves, comments every MCPD_PING_SECONDS; "
            "`event: reconnect` or `event: replaced` as it ends."
        ),
        tags=[TAG_PUBLISHER],
        parameters=[OpenApiParameter("session_id", str, OpenApiParameter.PATH)],
        responses={
            (200, "text/event-stream"): OpenApiResponse(OpenApiTypes.STR),
            **api_errors(401, 403, 404),
        },
    ),
    "/healthz": _described(
        "Healthz",
        "get",
        operation_id="healthz",
        public=True,
        summary="This worker serves",
        tags=[TAG_HEALTH],
        responses={200: HealthSerializer},
    ),
    "/readyz": _described(
        "Readyz",
        "get",
        operation_id="readyz",
        public=True,
        summary="This worker reaches its database, Redis and hub",
        tags=[TAG_HEALTH],
        responses={
            200: HealthSerializer,
            503: OpenApiResponse(HealthSerializer, description="`failed` names what is not."),
        },
    ),
    "/metrics": _described(
        "Metrics",
        "get",
        operation_id="metrics",
        summary="Prometheus metrics: this worker's series and the broker-wide gauges",
        description=(
            "The Prometheus text format (OpenMetrics when `Accept` asks for it): this "
            "worker's counters and histograms, and the gauges about the whole broker, read "
            "from the shared state (the same on every worker). For an admin token, or for "
            "anyone when the broker runs with `MCPD_METRICS_PUBLIC=1`."
        ),
        tags=[TAG_HEALTH],
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR),
            **api_errors(401, 403),
        },
    ),
}


def add_plain_views(endpoints: list[Endpoint]) -> list[Endpoint]:
    """drf-spectacular preprocessing hook: the plain views' routes, with their stand-ins."""
    enumerator: Any = EndpointEnumerator()  # its methods are untyped
    for pattern in get_resolver().url_patterns:
        if not isinstance(pattern, URLPattern) or hasattr(pattern.callback, "cls"):
            continue  # the admin, or a DRF view (described by drf-spectacular itself)
        if pattern.callback is edge.no_route:
            continue  # not an endpoint: the JSON 404 of every path no route takes
        regex = str(pattern.pattern)
        path: str = enumerator.get_path_from_regex(regex)
        if path.startswith("/admin/"):
            continue  # the admin's own pages (the Fleet page): HTML for a logged-in operator
        view = PLAIN.get(path)
        if view is None:
            warn(f"{path} is a plain view with no description in virtual_llms/openapi.py")
            continue
        callback = view.as_view()
        for method in enumerator.get_allowed_methods(callback):
            endpoints.append((path, regex, method, callback))
    return endpoints


# --- the views serving the document --------------------------------------------------------


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document, made once per process: it depends on the code only (it is
    public: no request or token changes it), and making it takes 20-130 ms of the thread
    all the process's sync code shares."""
    generator: Any = SchemaGenerator  # untyped
    generated: dict[str, Any] = generator().get_schema(request=None, public=True)
    return generated


class JsonRefusals:
    """A DRF view whose refusals are JSON (``application/json``) whatever its renderers are:
    the schema's OpenAPI renderers answered a 405 as ``application/vnd.oai.openapi+json``
    and the docs page's HTML renderer failed on them (tests/test_fuzz.py found both)."""

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(response, Response) and response.status_code >= 400:
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = "application/json"
        return super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]


class SchemaView(JsonRefusals, SpectacularAPIView):
    """The document, JSON unless ``?format=yaml`` or ``Accept`` asks for YAML."""

    content_negotiation_class = Negotiated
    renderer_classes = [
        OpenApiJsonRenderer,
        OpenApiJsonRenderer2,
        OpenApiYamlRenderer,
        OpenApiYamlRenderer2,
    ]

    def _get_schema_response(self, request: Request) -> Response:
        return Response(document())


class DocsView(JsonRefusals, SpectacularSwaggerView):
    """Swagger UI, its assets from drf-spectacular-sidecar (served under /static/)."""

    url_name = "openapi-schema"

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """GET and HEAD only, any other method a JSON 405 before DRF: DRF renders every answer
        of this view (OPTIONS' metadata, a 405) through its HTML template renderer, which has
        no template for them (a 500, found by tests/test_fuzz.py)."""
        if request.method not in ("GET", "HEAD"):
            error = ApiError(405, "method_not_allowed", f"Use GET or HEAD on {request.path}.")
            response = error.response(openai=False)
            response["Allow"] = "GET, HEAD"
            return response
        return super().dispatch(request, *args, **kwargs)

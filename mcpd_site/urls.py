"""URL routes: the publisher API, the REST API, the OpenAI-compatible client API, admin."""

from django.contrib import admin
from django.urls import path, re_path

from virtual_llms import edge, fleet_admin, health, inference, metrics, openapi, streams, views

# JSON in the contract's shapes on /api/ and /v1/, Django's pages for the admin (edge.py).
handler400 = "virtual_llms.edge.bad_request"
handler403 = "virtual_llms.edge.permission_denied"
handler404 = "virtual_llms.edge.not_found"
handler500 = "virtual_llms.edge.server_error"

# Matched in order: the per-request routes (inference, task results) come first.
urlpatterns = [
    # Client API
    *(
        path(endpoint.removeprefix("/"), streams.relayed(endpoint))
        for endpoint in inference.ENDPOINTS
    ),
    path("v1/models", streams.list_models),
    path("v1/models/<path:name>", streams.retrieve_model),
    # Publisher API
    path("api/v1/virtual/tasks/<str:task_id>/result", views.task_result),
    path("api/v1/virtual/tasks/<str:task_id>/chunks", views.task_chunks),
    path("api/v1/virtual/tasks/<str:task_id>/error", views.task_error),
    path("api/v1/virtual/register", views.RegisterView.as_view()),
    path("api/v1/virtual/heartbeat", views.HeartbeatView.as_view()),
    path("api/v1/virtual/status", views.StatusView.as_view()),
    path("api/v1/virtual/sessions/<str:session_id>/stream", streams.control_stream),
    # REST API
    path("api/v1/llms", views.LlmListView.as_view()),
    path(
        "api/v1/llms/<path:name>/backends/<str:session_id>/drain",
        views.BackendDrainView.as_view(),
    ),
    path("api/v1/llms/<path:name>", views.LlmDetailView.as_view()),
    # The OpenAPI document and its page
    path("api/schema/", openapi.SchemaView.as_view(), name="openapi-schema"),
    path("api/docs/", openapi.DocsView.as_view(), name="openapi-docs"),
    path("api/v1/usage", views.UsageView.as_view()),
    path("api/v1/usage/me", views.UsageMeView.as_view()),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", metrics.metrics_view),
    *fleet_admin.urls(),  # /admin/fleet/: the Fleet page, before the admin's catch-all
    path("admin/", admin.site.urls),
    # Last: any other path under /api/ or /v1/ is a JSON 404, whatever the method, DEBUG or not.
    re_path(r"^(?:api|v1)(?:/|$)", edge.no_route),
]

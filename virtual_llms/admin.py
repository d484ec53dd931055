"""Django admin for operators: watch LLM rows and sessions, evict, revoke tokens, set client
limits; the Usage page is usage_admin.py's."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from . import (
    backends,
    services,
    usage_admin,  # noqa: F401 - registers the Usage page
)
from .auth import token_create, token_revoke
from .errors import unavailable
from .models import ApiToken, Backend, Llm, LlmKind, ProviderSession, Role
from .state import get_state


class BackendInline(admin.TabularInline[Backend, Llm]):
    """A virtual row's backends, read-only; drained or evicted from the Backends list."""

    model = Backend
    extra = 0
    can_delete = False
    show_change_link = True
    fields = readonly_fields = (
        "session",
        "token",
        "owner",
        "model",
        "status",
        "max_concurrency",
        "draining",
        "last_heartbeat_at",
        "inactive_since",
    )

    def has_add_permission(self, request: HttpRequest, obj: Llm | None = None) -> bool:
        return False

    @admin.display(description="owner")
    def owner(self, obj: Backend) -> str:
        return obj.token.owner or "(the token itself)"


@admin.register(Llm)
class LlmAdmin(admin.ModelAdmin[Llm]):
    list_display = [
        "name",
        "kind",
        "status",
        "tier",
        "model",
        "provider_session_id",
        "last_heartbeat_at",
        "inactive_since",
    ]
    list_filter = ["kind", "status", "tier", "withdrawn"]
    search_fields = ["name", "model", "provider_session_id"]
    readonly_fields = [
        "id",
        "kind",
        "withdrawn",
        "provider_session_id",
        "publisher_token",
        "last_heartbeat_at",
        "inactive_since",
        "version",
        "created_at",
        "updated_at",
    ]
    fields = [
        "id",
        "name",
        "kind",
        "type",
        "model",
        "url",
        "tier",
        "description",
        "status",
        "withdrawn",
        "provider_session_id",
        "publisher_token",
        "last_heartbeat_at",
        "inactive_since",
        "version",
        "created_at",
        "updated_at",
    ]
    actions = ["evict", "mark_inactive"]
    inlines = [BackendInline]
    # A virtual row's fields are its publisher's: an edit here would make the broker and the
    # publisher disagree (a renamed row 404s under its old name and 502s under the new one).
    # Evict or mark inactive instead; the publisher's next registration sets them.
    PUBLISHER_OWNED = ["name", "type", "model", "url", "tier", "description", "status"]

    def get_readonly_fields(self, request: HttpRequest, obj: Llm | None = None) -> Any:
        fields = list(self.readonly_fields)
        if obj is not None and obj.kind == LlmKind.VIRTUAL:
            fields += self.PUBLISHER_OWNED
        return fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Public LLMs carry an encrypted key: they are created through the REST API.
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # eviction goes through the service
        return actions

    def delete_model(self, request: HttpRequest, obj: Llm) -> None:
        services.llm_evict(llm=obj)

    @admin.action(description="Evict selected LLMs (in-flight requests fail with 502)")
    def evict(self, request: HttpRequest, queryset: QuerySet[Llm]) -> None:
        names = []
        for row in queryset:
            services.llm_evict(llm=row)
            names.append(row.name)
        self.message_user(request, f"Evicted {len(names)}: {', '.join(names)}", messages.SUCCESS)

    @admin.action(description="Mark selected virtual LLMs inactive")
    def mark_inactive(self, request: HttpRequest, queryset: QuerySet[Llm]) -> None:
        names = list(queryset.filter(kind=LlmKind.VIRTUAL).values_list("name", flat=True))
        count = services.llm_mark_inactive(names=names)
        self.message_user(request, f"Marked {count} inactive.", messages.SUCCESS)


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin[Backend]):
    """Every backend of every pool: drain, end the drain, or evict one."""

    list_display = [
        "llm",
        "session",
        "token",
        "owner",
        "status",
        "slots",
        "draining",
        "last_heartbeat_at",
    ]
    list_filter = ["status", "draining"]
    search_fields = ["llm__name", "session__id", "token__label", "token__owner"]
    list_select_related = ["llm", "token"]
    readonly_fields = [
        "llm",
        "session",
        "token",
        "model",
        "max_concurrency",
        "status",
        "withdrawn",
        "draining",
        "last_heartbeat_at",
        "inactive_since",
        "created_at",
    ]
    actions = ["drain", "undrain", "evict"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # eviction goes through the service
        return actions

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)
        by_llm: dict[str, list[Backend]] = {}
        for row in rows:
            by_llm.setdefault(str(row.llm_id), []).append(row)
        for llm_id, group in by_llm.items():  # one read of the shared state per LLM shown
            counts = _in_flight(llm_id, [b.session_id for b in group])
            for row in group:
                in_flight = counts.get(row.session_id, 0) if counts is not None else None
                setattr(row, "mcpd_in_flight", in_flight)  # noqa: B010 - shown by slots()
        return changelist

    @admin.display(description="owner")
    def owner(self, obj: Backend) -> str:
        return obj.token.owner or "(the token itself)"

    @admin.display(description="in flight / slots")
    def slots(self, obj: Backend) -> str:
        in_flight = getattr(obj, "mcpd_in_flight", "?")
        limit = obj.max_concurrency if obj.max_concurrency is not None else "∞"
        return f"{'?' if in_flight is None else in_flight} / {limit}"

    @admin.action(description="Drain selected backends (no new tasks; running ones finish)")
    def drain(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        for backend in queryset.select_related("llm"):
            backends.backend_set_draining(backend=backend, draining=True)
        self.message_user(request, f"Draining {queryset.count()} backend(s).", messages.SUCCESS)

    @admin.action(description="End the drain of selected backends")
    def undrain(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        for backend in queryset.select_related("llm"):
            backends.backend_set_draining(backend=backend, draining=False)
        self.message_user(request, f"Undrained {queryset.count()} backend(s).", messages.SUCCESS)

    @admin.action(description="Evict selected backends (the row goes with its last one)")
    def evict(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        count = 0
        for backend in list(queryset.select_related("llm")):
            backends.backend_evict(backend=backend)
            count += 1
        self.message_user(request, f"Evicted {count} backend(s).", messages.SUCCESS)


def _revoke(token: ApiToken) -> bool:
    return token_revoke(token=token)


def _in_flight(llm_id: str, sids: list[str]) -> dict[str, int] | None:
    """Tasks in flight per backend across workers; None when the shared state is away."""
    try:
        return get_state().slots.counts_sync(llm_id, sids)
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        return None


@admin.register(ProviderSession)
class ProviderSessionAdmin(admin.ModelAdmin[ProviderSession]):
    list_display = ["id", "token", "created_at", "stream"]
    search_fields = ["id", "token__label"]
    readonly_fields = ["id", "token", "created_at", "stream"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One read of the shared state for the whole page, not one per row; the answer is
        # kept on each row of this request (the ModelAdmin itself is shared by requests).
        rows = list(changelist.result_list)
        held = _held([row.pk for row in rows])
        for row in rows:
            row.mcpd_stream = _stream_text(row.pk, held)
        return changelist

    @admin.display(description="control stream")
    def stream(self, obj: ProviderSession) -> str:
        text = getattr(obj, "mcpd_stream", None)
        return text if text is not None else _stream_text(obj.pk, _held([obj.pk]))


_UNKNOWN: set[str] = set()


def _stream_text(sid: str, held: set[str]) -> str:
    if held is _UNKNOWN:
        return "unknown (shared state unavailable)"
    return "connected" if sid in held else "none"


def _held(sids: list[str]) -> set[str]:
    """Which sessions hold a stream on a live worker; _UNKNOWN when the state is away."""
    if not sids:
        return set()
    try:
        return get_state().presence.held_sync(sids)
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        return _UNKNOWN


# A client token's limits (PROTOCOL.md "Client limits and usage"); workers see an edit
# within AUTH_CACHE_SECONDS (their cache of verified tokens).
LIMIT_FIELDS = ["rpm", "tpm", "max_concurrency"]


class ApiTokenForm(forms.ModelForm[ApiToken]):
    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        role = data.get("role", self.instance.role)
        if role != Role.CLIENT:
            for name in LIMIT_FIELDS:
                if data.get(name) is not None:
                    self.add_error(name, "Limits apply to client tokens only.")
        return data


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = [
        "label",
        "role",
        "owner",
        "prefix",
        "rpm",
        "tpm",
        "max_concurrency",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["role", ("revoked_at", admin.EmptyFieldListFilter)]
    form = ApiTokenForm
    search_fields = ["label", "prefix", "owner"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]
    # The change page has a Revoke button (a POST with the CSRF token, to revoke_view).
    change_form_template = "admin/virtual_llms/apitoken/change_form.html"

    def get_urls(self) -> list[URLPattern]:
        revoke = path(
            "<int:pk>/revoke/",
            self.admin_site.admin_view(require_POST(self.revoke_view)),
            name="virtual_llms_apitoken_revoke",
        )
        return [revoke, *super().get_urls()]

    def revoke_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        token = get_object_or_404(ApiToken, pk=pk)
        self._revoked(request, [token.label], _revoke(token))
        return HttpResponseRedirect(reverse("admin:virtual_llms_apitoken_change", args=[pk]))

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Any:
        if obj is None:
            return ["role", "label", "owner", *LIMIT_FIELDS]
        return [
            "role",
            "label",
            "owner",
            *LIMIT_FIELDS,
            "prefix",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Any:
        if obj is None:
            return []
        return ["role", "prefix", "created_at", "last_used_at", "revoked_at"]

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        try:
            token, plaintext = token_create(
                role=obj.role,
                label=obj.label,
                owner=obj.owner,
                **{name: getattr(obj, name) for name in LIMIT_FIELDS},
            )
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        obj.pk = token.pk
        obj.prefix = token.prefix
        obj.token_hash = token.token_hash
        obj.created_at = token.created_at
        obj._state.adding = False
        obj._state.db = token._state.db
        self.message_user(
            request,
            f"New {token.role} token — copy it now, it is not shown again: {plaintext}",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected tokens (refused at once; their streams close)")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        tokens = list(queryset)
        told = [_revoke(token) for token in tokens]
        self._revoked(request, [token.label for token in tokens], all(told))

    def _revoked(self, request: HttpRequest, labels: list[str], told: bool) -> None:
        if told:
            self.message_user(request, f"Revoked {', '.join(labels)}.", messages.SUCCESS)
            return
        self.message_user(
            request,
            f"Revoked {', '.join(labels)} in the database. The shared state (Redis) is "
            "unreachable, so the workers could not be told at once: each refuses the token "
            "and closes its streams within a second, from the database.",
            messages.WARNING,
        )

    def has_delete_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False  # revoke instead: rows keep their owner for the audit trail

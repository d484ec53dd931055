"""Request validation and the Llm row's JSON shape (camelCase, as in PROTOCOL.md)."""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator, URLValidator
from rest_framework import serializers

from .models import LLM_NAME_RE, SESSION_ID_RE, Backend, Llm, LlmStatus


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers, booleans and objects instead of casting them."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictBooleanField(serializers.BooleanField):
    """true or false only (DRF's BooleanField also takes "yes", 1, "on", ...)."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only (DRF's IntegerField also takes "4", 4.0 and true)."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(super().to_internal_value(data))


NAME_MESSAGE = "must be 1-128 characters of A-Z a-z 0-9 . _ : / -, starting with a letter or digit"


def name_field() -> StrictCharField:
    return StrictCharField(
        max_length=128,
        validators=[RegexValidator(LLM_NAME_RE, NAME_MESSAGE)],
    )


def session_field(**kwargs: Any) -> StrictCharField:
    return StrictCharField(
        max_length=64,
        validators=[
            RegexValidator(
                SESSION_ID_RE,
                "must be 1-64 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit",
            )
        ],
        **kwargs,
    )


class LlmSerializer(serializers.ModelSerializer[Llm]):
    providerSessionId = serializers.CharField(source="provider_session_id", allow_null=True)
    lastHeartbeatAt = serializers.DateTimeField(source="last_heartbeat_at", allow_null=True)
    inactiveSince = serializers.DateTimeField(source="inactive_since", allow_null=True)
    createdAt = serializers.DateTimeField(source="created_at")
    updatedAt = serializers.DateTimeField(source="updated_at")
    id = serializers.CharField()

    class Meta:
        model = Llm
        fields = [
            "id",
            "name",
            "type",
            "model",
            "url",
            "tier",
            "description",
            "kind",
            "providerSessionId",
            "status",
            "lastHeartbeatAt",
            "inactiveSince",
            "version",
            "createdAt",
            "updatedAt",
        ]
        read_only_fields = fields


def backend_json(backend: Backend, in_flight: int) -> dict[str, Any]:
    """One entry of a row's ``backends`` (PROTOCOL.md v1.1 "Pools")."""
    field = serializers.DateTimeField()
    return {
        "providerSessionId": backend.session_id,
        "model": backend.model,
        "status": backend.status,
        "maxConcurrency": backend.max_concurrency,
        "inFlight": in_flight,
        "lastHeartbeatAt": field.to_representation(backend.last_heartbeat_at)
        if backend.last_heartbeat_at
        else None,
        "inactiveSince": field.to_representation(backend.inactive_since)
        if backend.inactive_since
        else None,
        "draining": backend.draining,
    }


class ProviderSerializer(serializers.Serializer[Any]):
    name = name_field()
    type = StrictCharField(max_length=32)
    model = StrictCharField(max_length=256)
    tier = StrictCharField(max_length=32, required=False, default="fast")
    description = StrictCharField(max_length=4096, required=False, default="", allow_blank=True)
    status = serializers.ChoiceField(
        choices=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING], required=False, default="active"
    )
    # v1.1 "Pools": join the name as one more backend; how many tasks it runs at once.
    pool = StrictBooleanField(required=False, default=False)
    maxConcurrency = StrictIntegerField(
        source="max_concurrency",
        min_value=1,
        max_value=4096,
        required=False,
        allow_null=True,
        default=None,
    )


class RegisterSerializer(serializers.Serializer[Any]):
    providerSessionId = session_field(allow_null=True, required=False, default=None)
    # A publisher fronts a handful of models; 256 bounds one transaction's work.
    providers = serializers.ListField(child=ProviderSerializer(), max_length=256)


class HeartbeatSerializer(serializers.Serializer[Any]):
    providerSessionId = session_field()


class StatusSerializer(serializers.Serializer[Any]):
    providerSessionId = session_field()
    llmName = name_field()
    status = serializers.ChoiceField(choices=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING, "draining"])


class DrainSerializer(serializers.Serializer[Any]):
    draining = StrictBooleanField(required=False, default=True)


class PublicLlmCreateSerializer(serializers.Serializer[Any]):
    name = name_field()
    type = StrictCharField(max_length=32)
    model = StrictCharField(max_length=256)
    # URLField accepts http(s) and ftp(s); the validator narrows it to what httpx can call.
    url = serializers.URLField(
        max_length=2048, validators=[URLValidator(schemes=["http", "https"])]
    )
    tier = StrictCharField(max_length=32, required=False, default="fast")
    description = StrictCharField(max_length=4096, required=False, default="", allow_blank=True)
    apiKey = StrictCharField(max_length=4096, required=False, default="", allow_blank=True)

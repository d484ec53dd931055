"""Request validation and the Llm row's JSON shape (camelCase, as in PROTOCOL.md)."""

from __future__ import annotations

from typing import Any

from django.core.validators import RegexValidator, URLValidator
from rest_framework import serializers

from .models import LLM_NAME_RE, SESSION_ID_RE, Llm, LlmStatus


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers, booleans and objects instead of casting them."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


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


class ProviderSerializer(serializers.Serializer[Any]):
    name = name_field()
    type = StrictCharField(max_length=32)
    model = StrictCharField(max_length=256)
    tier = StrictCharField(max_length=32, required=False, default="fast")
    description = StrictCharField(max_length=4096, required=False, default="", allow_blank=True)
    status = serializers.ChoiceField(
        choices=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING], required=False, default="active"
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
    status = serializers.ChoiceField(choices=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING])


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

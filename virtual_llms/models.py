"""The registry's tables: LLM rows, their backends, provider sessions, API tokens and usage
records. No I/O beyond the ORM."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta

from django.core.validators import MaxLengthValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

# PROTOCOL.md "The Llm row": 1-128 characters of A-Z a-z 0-9 . _ : / -, starting with a
# letter or digit. The same rule is applied to every write path (API, admin, register).
LLM_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# Session ids come from publishers (a UUID by default, or their own sticky id).
SESSION_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"

_LLM_NAME = re.compile(LLM_NAME_RE)
_SESSION_ID = re.compile(SESSION_ID_RE)


def is_llm_name(value: str) -> bool:
    """Whether ``value`` could name an LLM: anything else names none, with no lookup (a NUL
    byte would even fail PostgreSQL's)."""
    return _LLM_NAME.fullmatch(value) is not None


# Task ids are secrets.token_urlsafe(18) (tasks.py): 24 characters of A-Z a-z 0-9 _ -.
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_task_id(value: str) -> bool:
    """Whether ``value`` could name a task (no Redis key is looked up for any other)."""
    return _TASK_ID.fullmatch(value) is not None


def is_session_id(value: str) -> bool:
    """Whether ``value`` could name a session."""
    return _SESSION_ID.fullmatch(value) is not None


llm_name_validator = RegexValidator(
    LLM_NAME_RE,
    "Name must be 1-128 characters of A-Z a-z 0-9 . _ : / -, starting with a letter or digit.",
    code="invalid_name",
)


class Role(models.TextChoices):
    PUBLISHER = "publisher"
    CLIENT = "client"
    ADMIN = "admin"


class ApiToken(models.Model):
    """A bearer token. Only a lookup prefix and a SHA-256 of the whole token are stored."""

    role = models.CharField(max_length=16, choices=Role.choices)
    label = models.CharField(max_length=128)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    token_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    owner = models.CharField(
        max_length=128,
        blank=True,
        default="",
        help_text="Publisher tokens with the same owner share their names: one may adopt "
        "another's inactive row, and both may serve one name as a pool. Empty: the token is "
        "its own owner.",
    )
    # Client limits (PROTOCOL.md "Client limits and usage"), held across all workers by
    # virtual_llms/limits.py; empty: no limit. A token with none costs no round trip.
    rpm = models.PositiveIntegerField(
        "requests per minute", null=True, blank=True, validators=[MinValueValidator(1)]
    )
    tpm = models.PositiveIntegerField(
        "tokens per minute",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Prompt + completion tokens the answers report, per minute.",
    )
    max_concurrency = models.PositiveIntegerField(
        "max concurrency",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Requests in flight at once.",
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(role__in=Role.values), name="apitoken_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.role}:{self.label} ({self.prefix}…)"

    @property
    def owner_key(self) -> str:
        """Who owns the names this token publishes: its owner, or the token itself."""
        return f"owner:{self.owner}" if self.owner else f"token:{self.pk}"

    @property
    def limited(self) -> bool:
        """Whether any client limit is set."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None


class ProviderSession(models.Model):
    """A publisher's session. It belongs to the token that created it, for good."""

    id = models.CharField(
        primary_key=True,
        max_length=64,
        validators=[RegexValidator(SESSION_ID_RE)],
    )
    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, related_name="sessions")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.id


class LlmKind(models.TextChoices):
    PUBLIC = "public"
    VIRTUAL = "virtual"


class LlmStatus(models.TextChoices):
    ACTIVE = "active"
    INACTIVE = "inactive"
    HIBERNATING = "hibernating"


class LlmQuerySet(models.QuerySet["Llm"]):
    def virtual(self) -> LlmQuerySet:
        return self.filter(kind=LlmKind.VIRTUAL)

    def listed(self) -> LlmQuerySet:
        """What clients may call: active and hibernating rows."""
        return self.filter(status__in=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING])

    def stale(self, now: datetime, stale_seconds: int) -> LlmQuerySet:
        """Live virtual rows whose publisher stopped heartbeating (a sleeping model's
        publisher still heartbeats, so hibernating rows count too)."""
        return self.virtual().filter(
            status__in=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING],
            last_heartbeat_at__lt=now - timedelta(seconds=stale_seconds),
        )

    def expired(self, now: datetime, retention_seconds: int) -> LlmQuerySet:
        """Virtual rows inactive for longer than the retention window."""
        return self.virtual().filter(
            status=LlmStatus.INACTIVE,
            inactive_since__lt=now - timedelta(seconds=retention_seconds),
        )


class Llm(models.Model):
    """An LLM clients can call by ``name``: public (proxied to ``url``) or virtual (relayed
    through the publisher session that owns it)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=128, unique=True, validators=[llm_name_validator])
    type = models.CharField(max_length=32, validators=[MaxLengthValidator(32)])
    model = models.CharField(max_length=256)
    url = models.CharField(max_length=2048, blank=True, default="")
    tier = models.CharField(max_length=32, blank=True, default="fast")
    description = models.TextField(blank=True, default="", validators=[MaxLengthValidator(4096)])
    kind = models.CharField(max_length=16, choices=LlmKind.choices, default=LlmKind.PUBLIC)
    # NULL, not "": a public row has no session, and the check constraint reads naturally.
    provider_session_id = models.CharField(  # noqa: DJ001 - NULL means "no session"
        max_length=64, null=True, blank=True, db_index=True
    )
    publisher_token = models.ForeignKey(
        ApiToken,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="llms",
        help_text="The publisher token that owns this virtual row.",
    )
    # Encrypted with Fernet (virtual_llms.crypto); never rendered anywhere.
    api_key_encrypted = models.TextField(blank=True, default="", editable=False)
    status = models.CharField(max_length=16, choices=LlmStatus.choices, default=LlmStatus.ACTIVE)
    withdrawn = models.BooleanField(
        default=False,
        help_text="Left out of its session's latest register: inactive until registered again; "
        "a heartbeat does not revive it.",
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    inactive_since = models.DateTimeField(null=True, blank=True)
    version = models.PositiveIntegerField(default=1)
    pool = models.BooleanField(
        default=False,
        help_text='First registered with "pool": true: sessions of the same owner may join it '
        "as more backends.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = LlmQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        indexes = [
            # gc_sweep's two queries: stale heartbeats and expired inactives.
            models.Index(fields=["kind", "status", "last_heartbeat_at"], name="llm_gc_stale_idx"),
            models.Index(fields=["kind", "status", "inactive_since"], name="llm_gc_expired_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=LlmKind.values), name="llm_kind_valid"),
            models.CheckConstraint(
                condition=Q(status__in=LlmStatus.values), name="llm_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(kind=LlmKind.PUBLIC) | Q(provider_session_id__isnull=False),
                name="llm_virtual_has_session",
            ),
            models.CheckConstraint(condition=Q(name__regex=LLM_NAME_RE), name="llm_name_charset"),
        ]

    def __str__(self) -> str:
        return self.name


class BackendQuerySet(models.QuerySet["Backend"]):
    def live(self) -> BackendQuerySet:
        return self.filter(status__in=[LlmStatus.ACTIVE, LlmStatus.HIBERNATING])

    def stale(self, now: datetime, stale_seconds: int) -> BackendQuerySet:
        """Live backends whose publisher stopped heartbeating."""
        return self.live().filter(last_heartbeat_at__lt=now - timedelta(seconds=stale_seconds))

    def expired(self, now: datetime, retention_seconds: int) -> BackendQuerySet:
        """Backends inactive for longer than the retention window."""
        return self.filter(
            status=LlmStatus.INACTIVE,
            inactive_since__lt=now - timedelta(seconds=retention_seconds),
        )


class Backend(models.Model):
    """One session serving a virtual row's name (PROTOCOL.md v1.1 "Pools"). The row's own
    status, ``inactive_since``, ``provider_session_id`` and ``publisher_token`` are derived
    from its backends (backends.derive); a row that is not a pool has exactly one."""

    llm = models.ForeignKey(Llm, on_delete=models.CASCADE, related_name="backends")
    session = models.ForeignKey(ProviderSession, on_delete=models.CASCADE, related_name="backends")
    # The session's token, kept here so the relay reads a backend without a join.
    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, related_name="backends")
    model = models.CharField(max_length=256)
    max_concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tasks this session runs at once; empty: no limit."
    )
    status = models.CharField(max_length=16, choices=LlmStatus.choices, default=LlmStatus.ACTIVE)
    withdrawn = models.BooleanField(default=False)
    draining = models.BooleanField(
        default=False, help_text="Gets no new task; finishes the ones it has."
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    inactive_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = BackendQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "pk"]
        indexes = [
            models.Index(fields=["status", "last_heartbeat_at"], name="backend_gc_stale_idx"),
            models.Index(fields=["status", "inactive_since"], name="backend_gc_expired_idx"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["llm", "session"], name="backend_one_per_session"),
            models.CheckConstraint(
                condition=Q(status__in=LlmStatus.values), name="backend_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(max_concurrency__isnull=True)
                | Q(max_concurrency__gte=1, max_concurrency__lte=4096),
                name="backend_max_concurrency_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.llm_id}@{self.session_id}"


class UsageRecordQuerySet(models.QuerySet["UsageRecord"]):
    def between(self, since: datetime, until: datetime) -> UsageRecordQuerySet:
        return self.filter(created_at__gte=since, created_at__lt=until)

    def older_than(self, cutoff: datetime) -> UsageRecordQuerySet:
        return self.filter(created_at__lt=cutoff)


class UsageRecord(models.Model):
    """One finished inference request (virtual_llms/usage.py writes them in batches)."""

    token = models.ForeignKey(
        ApiToken, null=True, on_delete=models.SET_NULL, related_name="usage_records"
    )
    # The name, not a key: rows come and go (gc_sweep), their usage stays.
    llm_name = models.CharField(max_length=128, blank=True, default="")
    endpoint = models.CharField(max_length=64)
    status = models.PositiveSmallIntegerField()
    code = models.CharField(max_length=64, blank=True, default="")  # the error's code
    streamed = models.BooleanField(default=False)
    # From the answer's ``usage``; NULL when the upstream reported none.
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    # Milliseconds: to the first byte of the body (NULL: none was sent), waiting in the
    # LLM's queue, waiting for a wake, and the whole call.
    ttfb_ms = models.FloatField(null=True, blank=True)
    queue_ms = models.FloatField(default=0.0)
    wake_ms = models.FloatField(default=0.0)
    duration_ms = models.FloatField()
    created_at = models.DateTimeField(db_index=True)

    objects = UsageRecordQuerySet.as_manager()

    class Meta:
        verbose_name = "usage record"
        verbose_name_plural = "usage"
        indexes = [
            models.Index(fields=["token", "created_at"], name="usage_token_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.llm_name} {self.status} at {self.created_at:%Y-%m-%d %H:%M:%S}"

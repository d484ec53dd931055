"""Writes to the registry. Keyword-only ``<entity>_<action>`` functions, each atomic.

The semantics are those of the original VirtualLlmService (register, heartbeat, unbind,
gcSweep) plus PROTOCOL.md's rules: a session belongs to the token that created it, a name
never passes to another publisher token while its row exists, and one register call is
applied whole or not at all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from . import crypto
from .errors import ApiError
from .models import ApiToken, Llm, LlmKind, LlmStatus, ProviderSession, is_session_id
from .state import get_state, name_field, session_field


@dataclass(frozen=True)
class ProviderSpec:
    """One entry of a register call's ``providers`` list (already validated)."""

    name: str
    type: str
    model: str
    tier: str = "fast"
    description: str = ""
    status: str = LlmStatus.ACTIVE


@dataclass(frozen=True)
class GcResult:
    marked_inactive: int
    deleted: int


def llm_touch(*fields: str) -> None:
    """Tell every worker that rows changed (by name, session or all: state.py's fields), so
    none serves a cached copy. Touched now and again at commit: a worker that reads the row
    between the two caches it under a stamp the second touch changes."""
    touched = list(fields)
    get_state().stamps.touch(touched)
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(lambda: get_state().stamps.touch(touched))


def _touch_session(sid: str) -> None:
    """A write to every row of a session: touch each row's name (what cached rows are
    checked against) and the session's stamp."""
    names = Llm.objects.filter(provider_session_id=sid).values_list("name", flat=True)
    llm_touch(session_field(sid), *[name_field(name) for name in names])


def llm_saved(*, llm: Llm) -> None:
    """Every save or delete of a row (services, admin, queryset deletes)."""
    llm_touch(name_field(llm.name))


def _conflict(message: str) -> ApiError:
    return ApiError(409, "name_conflict", message)


def session_get_owned(*, token: ApiToken, session_id: str, lock: bool = False) -> ProviderSession:
    """The session, if it exists (404) and belongs to ``token`` (403)."""
    if not is_session_id(session_id):  # no session has it: no lookup (a NUL byte fails PG's)
        raise ApiError(404, "session_not_found", f"Unknown session {session_id!r}.")
    qs = ProviderSession.objects.all()
    if lock:
        qs = qs.select_for_update()
    session = qs.filter(pk=session_id).first()
    if session is None:
        raise ApiError(404, "session_not_found", f"Unknown session '{session_id}'; register again.")
    if session.token_id != token.pk:
        raise ApiError(403, "forbidden", "This session belongs to another publisher token.")
    return session


def llm_register(
    *, token: ApiToken, session_id: str | None, providers: list[ProviderSpec]
) -> tuple[str, list[Llm]]:
    """Register (or re-register) a publisher session's LLMs. Returns (session id, rows)."""
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ApiError(400, "invalid_request", "Provider names must be unique within one call.")
    sid = session_id or str(uuid.uuid4())
    try:
        with transaction.atomic():
            rows = _register_locked(token=token, sid=sid, providers=providers)
    except IntegrityError as exc:
        # Two registers raced for one new name (or one new session id): the unique index
        # let exactly one win; this one is the loser and applied nothing.
        raise _conflict(
            "A concurrent registration claimed one of these names or this session id; "
            "retry to see its owner."
        ) from exc
    return sid, rows


def _register_locked(*, token: ApiToken, sid: str, providers: list[ProviderSpec]) -> list[Llm]:
    session = ProviderSession.objects.select_for_update().filter(pk=sid).first()
    if session is None:
        ProviderSession.objects.create(pk=sid, token=token)
    elif session.token_id != token.pk:
        raise ApiError(403, "forbidden", "This session belongs to another publisher token.")

    now = timezone.now()
    result: dict[str, Llm] = {}
    # Lock rows in name order so two registers touching the same names cannot deadlock.
    for spec in sorted(providers, key=lambda p: p.name):
        row = Llm.objects.select_for_update().filter(name=spec.name).first()
        if row is None:
            row = Llm.objects.create(
                name=spec.name,
                type=spec.type,
                model=spec.model,
                tier=spec.tier,
                description=spec.description,
                kind=LlmKind.VIRTUAL,
                provider_session_id=sid,
                publisher_token=token,
                status=spec.status,
                last_heartbeat_at=now,
                inactive_since=None,
            )
        elif row.kind == LlmKind.PUBLIC:
            raise _conflict(f"Cannot publish over public LLM '{spec.name}'")
        elif row.provider_session_id == sid:
            _apply(row, spec, sid=sid, token=token, now=now)  # sticky reconnect
        elif row.status != LlmStatus.INACTIVE:
            raise _conflict(f"'{spec.name}' is already active under a different session")
        elif row.publisher_token_id == token.pk:
            _apply(row, spec, sid=sid, token=token, now=now)  # adopt after a lapse
        else:
            raise _conflict(
                f"'{spec.name}' belongs to another publisher; an admin must evict it first"
            )
        result[spec.name] = row

    # Rows this session owned before and the new list leaves out go inactive, withdrawn: the
    # publisher no longer serves them, so its heartbeats must not bring them back.
    left_out = Llm.objects.filter(provider_session_id=sid).exclude(name__in=list(result))
    if left_out.exclude(status=LlmStatus.INACTIVE).update(
        status=LlmStatus.INACTIVE, inactive_since=now, version=F("version") + 1, updated_at=now
    ):
        _touch_session(sid)
    left_out.update(withdrawn=True)
    return [result[p.name] for p in providers]


def _apply(row: Llm, spec: ProviderSpec, *, sid: str, token: ApiToken, now: datetime) -> None:
    row.type = spec.type
    row.model = spec.model
    row.tier = spec.tier
    row.description = spec.description
    row.status = spec.status
    row.provider_session_id = sid
    row.publisher_token = token
    row.last_heartbeat_at = now
    row.inactive_since = None
    row.withdrawn = False
    row.version += 1
    row.save()


def llm_heartbeat(*, token: ApiToken, session_id: str) -> int:
    """Bump every row of the session and revive inactive ones. Returns the row count."""
    with transaction.atomic():
        session_get_owned(token=token, session_id=session_id)
        now = timezone.now()
        rows = Llm.objects.filter(provider_session_id=session_id, kind=LlmKind.VIRTUAL)
        count = rows.count()
        if rows.filter(status=LlmStatus.INACTIVE, withdrawn=False).update(
            status=LlmStatus.ACTIVE,
            inactive_since=None,
            last_heartbeat_at=now,
            version=F("version") + 1,
            updated_at=now,
        ):
            _touch_session(session_id)
        rows.exclude(status=LlmStatus.INACTIVE).update(last_heartbeat_at=now)
    return count


def llm_set_status(*, token: ApiToken, session_id: str, llm_name: str, status: str) -> Llm:
    """The publisher says its model went to sleep or woke by itself."""
    if status not in (LlmStatus.ACTIVE, LlmStatus.HIBERNATING):
        raise ApiError(400, "invalid_request", "status must be 'active' or 'hibernating'.")
    with transaction.atomic():
        session_get_owned(token=token, session_id=session_id)
        row = (
            Llm.objects.select_for_update()
            .filter(name=llm_name, provider_session_id=session_id, kind=LlmKind.VIRTUAL)
            .first()
        )
        if row is None:
            raise ApiError(
                404, "llm_not_found", f"No LLM '{llm_name}' is registered by this session."
            )
        now = timezone.now()
        row.status = status
        row.inactive_since = None
        row.last_heartbeat_at = now
        row.version += 1
        row.save()
    return row


def llm_mark_awake(*, llm_id: uuid.UUID, name: str, session_id: str) -> bool:
    """A wake of the session's backend succeeded: hibernating → active, heartbeat bumped.
    False if the row moved on."""
    now = timezone.now()
    changed = Llm.objects.filter(pk=llm_id, status=LlmStatus.HIBERNATING).update(
        status=LlmStatus.ACTIVE, last_heartbeat_at=now, version=F("version") + 1, updated_at=now
    )
    if changed:
        llm_touch(name_field(name))
    return changed == 1


def session_unbind(*, session_id: str) -> datetime:
    """The session's stream closed: all its rows go inactive at once. Returns the moment
    written to their ``inactive_since`` (session_rebind's key)."""
    now = timezone.now()
    if (
        Llm.objects.filter(provider_session_id=session_id, kind=LlmKind.VIRTUAL)
        .exclude(status=LlmStatus.INACTIVE)
        .update(
            status=LlmStatus.INACTIVE,
            inactive_since=now,
            version=F("version") + 1,
            updated_at=now,
        )
    ):
        _touch_session(session_id)
    return now


def session_rebind(*, session_id: str, unbound_at: datetime) -> int:
    """Undo one session_unbind (a newer stream bound the session meanwhile): the rows it
    made inactive become active again. Rows made inactive otherwise stay so."""
    now = timezone.now()
    count = Llm.objects.filter(
        provider_session_id=session_id,
        kind=LlmKind.VIRTUAL,
        status=LlmStatus.INACTIVE,
        inactive_since=unbound_at,
    ).update(
        status=LlmStatus.ACTIVE,
        inactive_since=None,
        version=F("version") + 1,
        updated_at=now,
    )
    if count:
        _touch_session(session_id)
    return count


def token_is_revoked(*, token_id: int) -> bool:
    return ApiToken.objects.filter(pk=token_id, revoked_at__isnull=False).exists()


def llm_mark_inactive(*, names: list[str]) -> int:
    """Operator action: take virtual rows out of service until their publisher heartbeats."""
    now = timezone.now()
    count = (
        Llm.objects.filter(name__in=names, kind=LlmKind.VIRTUAL)
        .exclude(status=LlmStatus.INACTIVE)
        .update(
            status=LlmStatus.INACTIVE, inactive_since=now, version=F("version") + 1, updated_at=now
        )
    )
    if count:
        llm_touch(*[name_field(name) for name in names])
    return count


def llm_create_public(
    *,
    name: str,
    type: str,
    model: str,
    url: str,
    tier: str = "fast",
    description: str = "",
    api_key: str = "",
) -> Llm:
    try:
        with transaction.atomic():
            return Llm.objects.create(
                name=name,
                type=type,
                model=model,
                url=url.rstrip("/"),
                tier=tier,
                description=description,
                kind=LlmKind.PUBLIC,
                status=LlmStatus.ACTIVE,
                api_key_encrypted=crypto.encrypt(api_key),
            )
    except IntegrityError as exc:
        raise _conflict(f"An LLM named '{name}' already exists.") from exc


def llm_evict(*, llm: Llm) -> None:
    """Delete the row at once; requests in flight for it fail with 502 llm_evicted."""
    from . import events  # the channel layer is only touched there

    llm_id = llm.pk
    llm.delete()
    events.broadcast_sync({"type": "llm.evicted", "llmId": str(llm_id)})


def gc_sweep(*, now: datetime | None = None, dry_run: bool = False) -> GcResult:
    """Stale live virtual rows → inactive; long-inactive virtual rows → deleted.

    Each step is one conditional statement, so two sweeps at the same moment never count a
    row twice: PostgreSQL re-checks the WHERE clause of a row another sweep just changed.
    """
    now = now or timezone.now()
    stale_seconds = settings.MCPD_HEARTBEAT_STALE_SECONDS
    retention = settings.MCPD_INACTIVE_RETENTION_SECONDS
    expired = Llm.objects.expired(now, retention)
    stale = Llm.objects.stale(now, stale_seconds)
    if dry_run:
        return GcResult(marked_inactive=stale.count(), deleted=expired.count())
    deleted, _ = expired.delete()
    marked = stale.update(
        status=LlmStatus.INACTIVE, inactive_since=now, version=F("version") + 1, updated_at=now
    )
    # Forget the stamps of rows and sessions that are gone; that touches every row once.
    live = {name_field(n) for n in Llm.objects.values_list("name", flat=True)}
    live |= {session_field(s) for s in ProviderSession.objects.values_list("pk", flat=True)}
    get_state().stamps.prune(live)
    return GcResult(marked_inactive=marked, deleted=deleted)

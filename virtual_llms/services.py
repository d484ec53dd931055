"""Writes to the registry. Keyword-only ``<entity>_<action>`` functions, each atomic.

The semantics are those of the original VirtualLlmService (register, heartbeat, unbind,
gcSweep) plus PROTOCOL.md's rules: a session belongs to the token that created it, a name
never passes to another owner while its row exists, and one register call is applied whole
or not at all. Since v1.1 they act on a row's backends (one per session serving the name;
backends.py derives the row from them).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from . import crypto, quotas
from .backends import derive, derive_many
from .errors import ApiError
from .models import ApiToken, Backend, Llm, LlmKind, LlmStatus, ProviderSession, is_session_id
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
    pool: bool = False
    max_concurrency: int | None = None


@dataclass(frozen=True)
class GcResult:
    marked_inactive: int  # rows outside pools, and backends of pools, that went stale
    deleted: int  # rows deleted (a pool's with its last backend)
    backends_deleted: int = 0  # backends of pools deleted while the row stays
    sessions_deleted: int = 0  # sessions that owned nothing (quotas.sweep_empty_sessions)


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
    names = Llm.objects.filter(backends__session_id=sid).values_list("name", flat=True)
    llm_touch(session_field(sid), *[name_field(name) for name in names])


def _session_backends(sid: str) -> QuerySet[Backend]:
    return Backend.objects.filter(session_id=sid, llm__kind=LlmKind.VIRTUAL)


def _update_backends(backends: QuerySet[Backend], **fields: Any) -> set[uuid.UUID]:
    """Update these backends; re-derive their rows. Returns the rows' ids (empty: no
    backend matched)."""
    ids = set(backends.values_list("llm_id", flat=True))
    if ids and backends.update(**fields):
        derive_many(ids)
        return ids
    return set()


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
        quotas.check_new_session(token)
        session = ProviderSession.objects.create(pk=sid, token=token)
    elif session.token_id != token.pk:
        raise ApiError(403, "forbidden", "This session belongs to another publisher token.")
    quotas.check_names(token, [p.name for p in providers])

    now = timezone.now()
    result: dict[str, Llm] = {}
    # Lock rows in name order so two registers touching the same names cannot deadlock.
    for spec in sorted(providers, key=lambda p: p.name):
        row = Llm.objects.select_for_update().filter(name=spec.name).first()
        if row is None:
            row = Llm(
                name=spec.name,
                type=spec.type,
                model=spec.model,
                tier=spec.tier,
                description=spec.description,
                kind=LlmKind.VIRTUAL,
                provider_session_id=sid,
                publisher_token=token,
                status=spec.status,
                pool=spec.pool,
                last_heartbeat_at=now,
                inactive_since=None,
            )
            row.mcpd_managed = True  # type: ignore[attr-defined] # backends.mirror: not needed
            row.save(force_insert=True)
            _backend_apply(row, session, spec, now=now, token=token)
        elif row.kind == LlmKind.PUBLIC:
            raise _conflict(f"Cannot publish over public LLM '{spec.name}'")
        else:
            _register_on(row, session, spec, token=token, now=now)
        result[spec.name] = row

    # Backends this session had before and the new list leaves out go inactive, withdrawn:
    # the publisher no longer serves them, so its heartbeats must not bring them back.
    left_out = _session_backends(sid).exclude(llm__name__in=list(result))
    if _update_backends(
        left_out.exclude(status=LlmStatus.INACTIVE), status=LlmStatus.INACTIVE, inactive_since=now
    ):
        _touch_session(sid)
    _update_backends(left_out, withdrawn=True)
    return [result[p.name] for p in providers]


def _register_on(
    row: Llm, session: ProviderSession, spec: ProviderSpec, *, token: ApiToken, now: datetime
) -> None:
    """One provider of a register call naming an existing virtual row (locked): a sticky
    reconnect, an adoption after a lapse, or a join of a pool (PROTOCOL.md v1.1)."""
    backends = list(Backend.objects.select_for_update().filter(llm=row))
    mine = next((b for b in backends if b.session_id == session.pk), None)
    others_live = [
        b for b in backends if b.session_id != session.pk and b.status != LlmStatus.INACTIVE
    ]
    same_owner = _owner_of(row) == token.owner_key
    if mine is not None and not (others_live and spec.pool != row.pool):
        # Sticky reconnect. Alone on the name, the session may turn it into a pool (an
        # agent restarted with pool = true keeps its session) or back; with others serving
        # it, the flag stays.
        if not others_live:
            row.pool = spec.pool
    elif not same_owner:
        if row.status != LlmStatus.INACTIVE or others_live:
            raise _conflict(f"'{spec.name}' is already active under a different session")
        raise _conflict(f"'{spec.name}' belongs to another publisher; an admin must evict it first")
    elif others_live:
        if not (row.pool and spec.pool):
            raise _conflict(f"'{spec.name}' is already active under a different session")
        # join the pool
    else:
        # Adopt after a lapse: as a fresh registration of the name. A pool keeps its other
        # (inactive) backends when it is joined again; a row that is not one has one backend.
        if not (row.pool and spec.pool):
            Backend.objects.filter(llm=row).exclude(session=session).delete()
        row.pool = spec.pool
    row.type, row.tier, row.description = spec.type, spec.tier, spec.description
    row.version += 1
    # An UPDATE without the save signal: _backend_apply touches the row once for all.
    Llm.objects.filter(pk=row.pk).update(
        type=row.type,
        tier=row.tier,
        description=row.description,
        pool=row.pool,
        version=row.version,
        updated_at=now,
    )
    _backend_apply(row, session, spec, now=now, token=token)


def _owner_of(row: Llm) -> str | None:
    token = row.publisher_token
    return None if token is None else token.owner_key


def _backend_apply(
    row: Llm, session: ProviderSession, spec: ProviderSpec, *, now: datetime, token: ApiToken
) -> None:
    Backend.objects.update_or_create(
        llm=row,
        session=session,
        defaults={
            "token": token,
            "model": spec.model,
            "max_concurrency": spec.max_concurrency,
            "status": spec.status,
            "withdrawn": False,
            "draining": False,
            "last_heartbeat_at": now,
            "inactive_since": None,
        },
    )
    derive(row, now=now)
    llm_touch(name_field(row.name))


def llm_heartbeat(*, token: ApiToken, session_id: str) -> int:
    """Bump every backend of the session and revive inactive ones. Returns their count."""
    with transaction.atomic():
        session_get_owned(token=token, session_id=session_id)
        now = timezone.now()
        backends = _session_backends(session_id)
        # A row outside a pool is its backend's authority (rowcache._backends), as in v1:
        # one made inactive by a write to the row alone is revived like any other.
        backends.filter(llm__pool=False, llm__status=LlmStatus.INACTIVE).exclude(
            status=LlmStatus.INACTIVE
        ).update(status=LlmStatus.INACTIVE)
        count = backends.count()
        revived = _update_backends(
            backends.filter(status=LlmStatus.INACTIVE, withdrawn=False),
            status=LlmStatus.ACTIVE,
            inactive_since=None,
            last_heartbeat_at=now,
        )
        if revived:
            _touch_session(session_id)
        backends.exclude(status=LlmStatus.INACTIVE).update(last_heartbeat_at=now)
        # The rows' own heartbeat, for v1 readers (one statement, no re-derive).
        Llm.objects.filter(backends__session_id=session_id, backends__status__in=_LIVE).exclude(
            pk__in=list(revived)
        ).update(last_heartbeat_at=now)
    return count


_LIVE = [LlmStatus.ACTIVE, LlmStatus.HIBERNATING]
STATUSES = (LlmStatus.ACTIVE, LlmStatus.HIBERNATING, "draining")


def llm_set_status(*, token: ApiToken, session_id: str, llm_name: str, status: str) -> Llm:
    """The publisher says its backend went to sleep, woke by itself, or drains (no new task;
    ``active`` ends the drain)."""
    if status not in STATUSES:
        raise ApiError(
            400, "invalid_request", "status must be 'active', 'hibernating' or 'draining'."
        )
    with transaction.atomic():
        session_get_owned(token=token, session_id=session_id)
        backend = (
            Backend.objects.select_for_update()
            .select_related("llm")
            .filter(llm__name=llm_name, session_id=session_id, llm__kind=LlmKind.VIRTUAL)
            .first()
        )
        if backend is None:
            raise ApiError(
                404, "llm_not_found", f"No LLM '{llm_name}' is registered by this session."
            )
        now = timezone.now()
        if status == "draining":
            backend.draining = True
        else:
            backend.status = status
            backend.draining = False
            backend.inactive_since = None
            backend.withdrawn = False
        backend.last_heartbeat_at = now
        backend.save()
        row = backend.llm
        if not derive(row, now=now):  # draining, or a status the row already had
            row.version += 1
            Llm.objects.filter(pk=row.pk).update(version=row.version, updated_at=now)
        llm_touch(name_field(row.name))
    return row


def llm_mark_awake(*, llm_id: uuid.UUID, name: str, session_id: str) -> bool:
    """A wake of the session's backend succeeded: hibernating → active, heartbeat bumped.
    False if the backend moved on."""
    now = timezone.now()
    with transaction.atomic():
        backends = Backend.objects.filter(llm_id=llm_id, session_id=session_id)
        # A row outside a pool is its backend's authority (rowcache._backends), as in v1.
        if not Llm.objects.filter(pk=llm_id, pool=False, status=LlmStatus.HIBERNATING).exists():
            backends = backends.filter(status=LlmStatus.HIBERNATING)
        changed = bool(_update_backends(backends, status=LlmStatus.ACTIVE, last_heartbeat_at=now))
        if changed:
            llm_touch(name_field(name))
    return changed


def session_unbind(*, session_id: str) -> datetime:
    """The session's stream closed: all its backends go inactive at once. Returns the moment
    written to their ``inactive_since`` (session_rebind's key)."""
    now = timezone.now()
    with transaction.atomic():
        if _update_backends(
            _session_backends(session_id).exclude(status=LlmStatus.INACTIVE),
            status=LlmStatus.INACTIVE,
            inactive_since=now,
        ):
            _touch_session(session_id)
    return now


def session_rebind(*, session_id: str, unbound_at: datetime) -> int:
    """Undo one session_unbind (a newer stream bound the session meanwhile): the backends it
    made inactive become active again. Backends made inactive otherwise stay so."""
    with transaction.atomic():
        backends = _session_backends(session_id).filter(
            status=LlmStatus.INACTIVE, inactive_since=unbound_at
        )
        count = backends.count()
        if _update_backends(backends, status=LlmStatus.ACTIVE, inactive_since=None):
            _touch_session(session_id)
    return count


def token_is_revoked(*, token_id: int) -> bool:
    return ApiToken.objects.filter(pk=token_id, revoked_at__isnull=False).exists()


def llm_mark_inactive(*, names: list[str]) -> int:
    """Operator action: take virtual rows (all their backends) out of service until their
    publishers heartbeat. Returns how many rows went inactive."""
    now = timezone.now()
    with transaction.atomic():
        live = Llm.objects.filter(name__in=names, kind=LlmKind.VIRTUAL).exclude(
            status=LlmStatus.INACTIVE
        )
        count = live.count()
        _update_backends(
            Backend.objects.filter(llm__in=live).exclude(status=LlmStatus.INACTIVE),
            status=LlmStatus.INACTIVE,
            inactive_since=now,
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
    """Stale live backends → inactive; long-inactive backends → deleted, and a virtual row
    with its last backend. ``dry_run``: the same sweep, rolled back.

    Each step is one conditional statement, so two sweeps at the same moment never count a
    backend twice: PostgreSQL re-checks the WHERE clause of a row another sweep just changed.
    """
    now = now or timezone.now()
    if dry_run:
        with transaction.atomic():
            result = _sweep(now)
            transaction.set_rollback(True)
            return result
    with transaction.atomic():
        result = _sweep(now)
    # Forget the stamps of rows and sessions that are gone; that touches every row once.
    live = {name_field(n) for n in Llm.objects.values_list("name", flat=True)}
    live |= {session_field(s) for s in ProviderSession.objects.values_list("pk", flat=True)}
    get_state().stamps.prune(live)
    return result


def _sweep(now: datetime) -> GcResult:
    stale_seconds = settings.MCPD_HEARTBEAT_STALE_SECONDS
    retention = settings.MCPD_INACTIVE_RETENTION_SECONDS
    # A row that is not a pool is swept by its own columns, exactly as in v1 (its backend
    # follows); a pool by its backends, the row going with its last one.
    rows = Llm.objects.filter(pool=False)
    _, per_model = rows.expired(now, retention).delete()
    deleted = per_model.get(Llm._meta.label, 0)
    stale_rows = rows.stale(now, stale_seconds)
    stale_ids = list(stale_rows.values_list("pk", flat=True))
    marked = stale_rows.update(
        status=LlmStatus.INACTIVE, inactive_since=now, version=F("version") + 1, updated_at=now
    )
    Backend.objects.filter(llm_id__in=stale_ids).update(
        status=LlmStatus.INACTIVE, inactive_since=now
    )

    pooled = Backend.objects.filter(llm__kind=LlmKind.VIRTUAL, llm__pool=True)
    expired = pooled.expired(now, retention)
    doomed = (
        Llm.objects.virtual()
        .filter(pool=True, backends__in=expired)
        .exclude(backends__in=pooled.exclude(pk__in=expired.values("pk")))
    )
    doomed_ids = list(doomed.values_list("pk", flat=True).distinct())
    _, per_model = Llm.objects.filter(pk__in=doomed_ids).delete()
    deleted += per_model.get(Llm._meta.label, 0)
    pool_ids = set(expired.values_list("llm_id", flat=True))
    backends_deleted, _ = expired.delete()
    stale = pooled.stale(now, stale_seconds)
    pool_ids |= set(stale.values_list("llm_id", flat=True))
    marked += stale.update(status=LlmStatus.INACTIVE, inactive_since=now)
    derive_many(pool_ids)
    return GcResult(
        marked_inactive=marked,
        deleted=deleted,
        backends_deleted=backends_deleted,
        sessions_deleted=quotas.sweep_empty_sessions(now),
    )

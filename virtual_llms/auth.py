"""Bearer tokens: creation, lookup and role checks, one code path for DRF views, plain
async views and WebSocket handshakes.

A token reads ``mcpd_<prefix>_<secret>``. The prefix finds the row; the SHA-256 of the whole
token is compared in constant time. Tokens are 256-bit random, so a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from .errors import ApiError
from .models import ApiToken, Role

# last_used_at is written at most this often per token, so auth stays one read per request.
log = logging.getLogger("mcpd.auth")

LAST_USED_RESOLUTION = timedelta(seconds=60)
# A verified token is remembered by this process for this long, so the hot path (inference,
# result POSTs) skips the database. Revocation clears it on every worker at once through a
# broadcast (hub.Hub, "token.revoked"); this bound covers a broadcast that was lost.
# Only the async hot path reads it (aauthenticate); the /api/ views, stream opens and
# WebSocket handshakes, which read the database anyway, check the row every time
# (``fresh``), so a revoked token is refused there at once on every worker even before the
# broadcast arrives.
# It is also the bound on how long a revoked client token is still accepted on a worker the
# ``token.revoked`` broadcast did not reach (a Redis restart loses broadcasts): the contract
# wants a revoked token dead everywhere within 1 s. One row read per token per second.
AUTH_CACHE_SECONDS = 1.0
# While the database is unreachable (a PostgreSQL restart or fail-over), the hot path still
# accepts a token this process verified in the last AUTH_STALE_SECONDS, so the relay (client
# calls, publishers' answers) goes on instead of failing every call, and a task dispatched
# before the outage gets its answer. Safe because a token cannot be revoked while the
# database is away (token_revoke writes the row first), and a revoke's broadcast drops the
# token from here at once (forget_token). The bound covers a worker cut off from the
# database alone while others revoke (and the broadcast lost as well); a PostgreSQL restart
# takes seconds, a managed fail-over a minute or two.
AUTH_STALE_SECONDS = 120.0

_verified: dict[str, tuple[ApiToken, float]] = {}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_create(
    *,
    role: str,
    label: str,
    owner: str = "",
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrency: int | None = None,
) -> tuple[ApiToken, str]:
    """Make a token, with client limits if given; the plaintext is returned once and never
    stored. ``owner``: publisher tokens with the same owner share their names (PROTOCOL.md
    v1.1 "Owners")."""
    if role not in Role.values:
        raise ValueError(f"role must be one of {', '.join(Role.values)}")
    if not label or len(label) > 128:
        raise ValueError("label must be 1-128 characters")
    if len(owner) > 128 or owner != owner.strip():
        raise ValueError("owner must be at most 128 characters, without surrounding spaces")
    if owner and role != Role.PUBLISHER:
        raise ValueError("only publisher tokens have an owner")
    limits = {"rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive integer")
    if role != Role.CLIENT and any(v is not None for v in limits.values()):
        raise ValueError("limits apply to client tokens only")
    prefix = secrets.token_hex(6)
    plaintext = f"mcpd_{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(
        role=role,
        label=label,
        prefix=prefix,
        token_hash=_hash(plaintext),
        owner=owner,
        **limits,
    )
    return token, plaintext


def token_revoke(*, token: ApiToken) -> bool:
    """Refuse the token from now on and close every stream it holds, on every worker: at
    once through a broadcast, and within a second from the database when the broadcast
    cannot be sent (revocation.py). False when the shared state was unreachable."""
    from . import events  # the channel layer is only touched there
    from .errors import unavailable

    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    forget_token(token_id=token.pk)
    try:
        events.broadcast_sync({"type": "token.revoked", "tokenId": token.pk})
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        log.warning("token %s revoked; the broadcast failed (%s)", token.pk, exc)
        return False
    return True


def forget_token(*, token_id: int) -> None:
    """Drop a token from this process's cache of verified tokens."""
    for digest, (token, _) in list(_verified.items()):
        if token.pk == token_id:
            _verified.pop(digest, None)


def _cached(plaintext: str, *, stale: bool = False) -> ApiToken | None:
    """The token if this process verified it in the last AUTH_CACHE_SECONDS (``stale``: in
    the last AUTH_STALE_SECONDS)."""
    hit = _verified.get(_hash(plaintext))
    extra = AUTH_STALE_SECONDS - AUTH_CACHE_SECONDS if stale else 0.0
    if hit is None or hit[1] + extra < time.monotonic():
        return None
    return hit[0]


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authenticate_token(plaintext: str | None, *, fresh: bool = False) -> ApiToken:
    """The row of a valid, unrevoked token, or ApiError 401. ``fresh``: read the row even
    if this process verified the token a moment ago."""
    if not plaintext:
        raise ApiError(401, "unauthorized", "Missing bearer token (Authorization: Bearer …).")
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "mcpd":
        raise ApiError(401, "unauthorized", "Unknown or revoked token.")
    cached = None if fresh else _cached(plaintext)
    if cached is not None:
        return cached
    digest = _hash(plaintext)
    token = ApiToken.objects.filter(prefix=parts[1]).first()
    if (
        token is None
        or token.revoked_at is not None
        or not hmac.compare_digest(token.token_hash, digest)
    ):
        raise ApiError(401, "unauthorized", "Unknown or revoked token.")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    _verified[digest] = (token, time.monotonic() + AUTH_CACHE_SECONDS)
    return token


def require_role(token: ApiToken, roles: Iterable[str]) -> None:
    allowed = set(roles)
    if token.role not in allowed:
        raise ApiError(
            403,
            "forbidden",
            f"A {token.role} token may not do this (needs {' or '.join(sorted(allowed))}).",
        )


def authenticate(header: str | None, roles: Iterable[str]) -> ApiToken:
    """The sync check (stream opens, WebSocket handshakes, the cache's miss path): always
    reads the row."""
    token = authenticate_token(parse_bearer(header), fresh=True)
    require_role(token, roles)
    return token


async def aauthenticate(header: str | None, roles: Iterable[str]) -> ApiToken:
    """The same check from async code: no hop to the ORM thread for a token verified in the
    last AUTH_CACHE_SECONDS, nor for one verified in the last AUTH_STALE_SECONDS while the
    database is unreachable."""
    plaintext = parse_bearer(header)
    cached = _cached(plaintext) if plaintext else None
    if cached is not None:
        require_role(cached, roles)
        return cached
    try:
        return await sync_to_async(authenticate)(header, tuple(roles))
    except (OperationalError, InterfaceError):
        stale = _cached(plaintext, stale=True) if plaintext else None
        if stale is None:
            raise  # a 503 database_unavailable (errors.unavailable)
        require_role(stale, roles)
        return stale


def header_from_scope(scope: Mapping[str, Any]) -> str | None:
    """The Authorization header of an ASGI (WebSocket) scope."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


CLIENT_ROLES = (Role.CLIENT, Role.ADMIN)
PUBLISHER_ROLES = (Role.PUBLISHER,)
ADMIN_ROLES = (Role.ADMIN,)

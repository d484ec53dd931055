"""Bearer tokens: creation, lookup and role checks, one code path for DRF views, plain
async views and WebSocket handshakes.

A token reads ``mcpd_<prefix>_<secret>``. The prefix finds the row; the SHA-256 of the whole
token is compared in constant time. Tokens are 256-bit random, so a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.utils import timezone

from .errors import ApiError
from .models import ApiToken, Role

# last_used_at is written at most this often per token, so auth stays one read per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_create(*, role: str, label: str) -> tuple[ApiToken, str]:
    """Make a token; the plaintext is returned once and never stored."""
    if role not in Role.values:
        raise ValueError(f"role must be one of {', '.join(Role.values)}")
    if not label or len(label) > 128:
        raise ValueError("label must be 1-128 characters")
    prefix = secrets.token_hex(6)
    plaintext = f"mcpd_{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(
        role=role, label=label, prefix=prefix, token_hash=_hash(plaintext)
    )
    return token, plaintext


def token_revoke(*, token: ApiToken) -> None:
    """Refuse the token from now on and close every stream it holds, on every worker."""
    from . import events  # the channel layer is only touched there

    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    events.broadcast_sync({"type": "token.revoked", "tokenId": token.pk})


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authenticate_token(plaintext: str | None) -> ApiToken:
    """The row of a valid, unrevoked token, or ApiError 401."""
    if not plaintext:
        raise ApiError(401, "unauthorized", "Missing bearer token (Authorization: Bearer …).")
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "mcpd":
        raise ApiError(401, "unauthorized", "Unknown or revoked token.")
    token = ApiToken.objects.filter(prefix=parts[1]).first()
    if (
        token is None
        or token.revoked_at is not None
        or not hmac.compare_digest(token.token_hash, _hash(plaintext))
    ):
        raise ApiError(401, "unauthorized", "Unknown or revoked token.")
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
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
    token = authenticate_token(parse_bearer(header))
    require_role(token, roles)
    return token


async def aauthenticate(header: str | None, roles: Iterable[str]) -> ApiToken:
    """The same check from async code (one hop to the ORM thread)."""
    return await sync_to_async(authenticate)(header, tuple(roles))


def header_from_scope(scope: dict[str, Any]) -> str | None:
    """The Authorization header of an ASGI (WebSocket) scope."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


CLIENT_ROLES = (Role.CLIENT, Role.ADMIN)
PUBLISHER_ROLES = (Role.PUBLISHER,)
ADMIN_ROLES = (Role.ADMIN,)

"""The verified-token cache while the database is away (auth.AUTH_STALE_SECONDS, issue 22):
a token this process verified lately is still accepted on the hot path; one it never
verified, or was told is revoked, is not. The multi-process side: test_multiproc_pg_restart."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError

from virtual_llms import auth
from virtual_llms.errors import ApiError, unavailable

pytestmark = [pytest.mark.django_db(transaction=True)]


def _database_away(header: str | None, roles: tuple[str, ...]) -> auth.ApiToken:
    raise OperationalError("connection refused")


@pytest.fixture
def expired_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every verification is out of date at once: each call asks the database again."""
    monkeypatch.setattr(auth, "AUTH_CACHE_SECONDS", 0.0)
    auth._verified.clear()


async def test_a_token_verified_lately_is_accepted_while_the_database_is_away(
    expired_at_once: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, plaintext = await sync_to_async(auth.token_create)(role="client", label="c")
    header = f"Bearer {plaintext}"
    assert (await auth.aauthenticate(header, auth.CLIENT_ROLES)).pk == token.pk
    monkeypatch.setattr(auth, "authenticate", _database_away)
    assert (await auth.aauthenticate(header, auth.CLIENT_ROLES)).pk == token.pk
    # The role is still checked.
    with pytest.raises(ApiError) as refused:
        await auth.aauthenticate(header, auth.PUBLISHER_ROLES)
    assert refused.value.status == 403


async def test_a_token_not_verified_lately_or_revoked_is_refused_with_a_503(
    expired_at_once: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, plaintext = await sync_to_async(auth.token_create)(role="client", label="c")
    _, never_seen = await sync_to_async(auth.token_create)(role="client", label="d")
    header = f"Bearer {plaintext}"
    assert (await auth.aauthenticate(header, auth.CLIENT_ROLES)).pk == token.pk
    auth.forget_token(token_id=token.pk)  # as a token.revoked broadcast does
    monkeypatch.setattr(auth, "authenticate", _database_away)
    for plain in (plaintext, never_seen):
        with pytest.raises(OperationalError) as away:
            await auth.aauthenticate(f"Bearer {plain}", auth.CLIENT_ROLES)
        refusal = unavailable(away.value)
        assert refusal is not None
        assert (refusal.status, refusal.code) == (503, "database_unavailable")
        assert refusal.headers["Retry-After"] == "1"


async def test_a_verification_older_than_the_stale_bound_is_not_used(
    expired_at_once: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, plaintext = await sync_to_async(auth.token_create)(role="client", label="c")
    header = f"Bearer {plaintext}"
    await auth.aauthenticate(header, auth.CLIENT_ROLES)
    monkeypatch.setattr(auth, "AUTH_STALE_SECONDS", 0.0)
    monkeypatch.setattr(auth, "authenticate", _database_away)
    with pytest.raises(OperationalError):
        await auth.aauthenticate(header, auth.CLIENT_ROLES)

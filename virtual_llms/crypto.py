"""Encryption of public LLMs' upstream API keys at rest (Fernet: AES-128-CBC + HMAC)."""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@cache
def _fernet(secret: str) -> Fernet:
    if settings.MCPD_ENCRYPTION_KEY:
        return Fernet(settings.MCPD_ENCRYPTION_KEY.encode())
    # Derived from SECRET_KEY: rotating SECRET_KEY makes stored keys unreadable, so
    # production sets MCPD_ENCRYPTION_KEY (a Fernet key) on its own.
    digest = hashlib.sha256(b"mcpd.api-key-encryption:" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(plaintext: str) -> str:
    if not plaintext:
        return ""
    return _fernet(settings.SECRET_KEY).encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    if not ciphertext:
        return ""
    try:
        return _fernet(settings.SECRET_KEY).decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("stored API key cannot be decrypted with this key") from exc

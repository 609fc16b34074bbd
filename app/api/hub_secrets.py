"""The tenant's hub token at rest: AES-256-GCM under a key derived from DLW_SECRET_KEY, with the
tenant id as associated data (a ciphertext copied to another tenant's row does not decrypt).
Layout: version byte 1, 12-byte random nonce, ciphertext with its 16-byte tag. The database only
ever holds this (dlw.hub_tokens); the clear token exists in the API's memory while it asks the
hub, and in a claim response to an executor of that tenant's files."""

from __future__ import annotations

import hashlib
import logging
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("dlw.api.hub")

VERSION = b"\x01"
NONCE_BYTES = 12
# Outside dev mode the startup guard refuses a missing or shorter key (app/api/startup_guard.py).
MIN_KEY_BYTES = 32
# Dev mode only (`dlw dev`, tests in dev mode): a fixed key, so a missing setting is no obstacle
# there; never accepted outside dev mode.
DEV_KEY = "dlw-dev-mode-secret-key-not-for-production"


class SecretKeyMissing(Exception):
    """No DLW_SECRET_KEY: hub tokens can be neither stored nor read (fail closed)."""


class UndecryptableToken(Exception):
    """The stored ciphertext does not open with this key (key changed, or row tampered with)."""


def _aead(secret: str) -> AESGCM:
    # The setting is a passphrase of >= 32 bytes; SHA-256 turns it into the 256-bit key.
    return AESGCM(hashlib.sha256(b"dlw hub token v1\x00" + secret.encode()).digest())


def key_of(secret_key: str | None, dev_mode: bool) -> str:
    if secret_key:
        return secret_key
    if dev_mode:
        return DEV_KEY
    raise SecretKeyMissing("DLW_SECRET_KEY is not set")


def seal(secret: str, tenant_id: int, token: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + _aead(secret).encrypt(nonce, token.encode(), b"tenant:%d" % tenant_id)


def unseal(secret: str, tenant_id: int, blob: bytes) -> str:
    if blob[:1] != VERSION or len(blob) < 1 + NONCE_BYTES + 16:
        raise UndecryptableToken("unknown ciphertext layout")
    try:
        clear = _aead(secret).decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], b"tenant:%d" % tenant_id)
    except InvalidTag as exc:
        raise UndecryptableToken("the hub token does not decrypt with DLW_SECRET_KEY") from exc
    return clear.decode()


def opened(secret_key: str | None, dev_mode: bool, tenant_id: int, blob: bytes | None) -> str | None:
    """The clear token of a stored ciphertext, or None: none stored, or it cannot be opened (no
    key, another key): then the caller goes on without it, so gated repositories are refused
    (fail closed) and an error line tells the operator to have the token set again."""
    if blob is None:
        return None
    try:
        return unseal(key_of(secret_key, dev_mode), tenant_id, bytes(blob))
    except (SecretKeyMissing, UndecryptableToken) as exc:
        log.error("tenant %s: the stored hub token is unusable (%s); set it again", tenant_id, exc)
        return None

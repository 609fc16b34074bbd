"""The login's state, nonce and PKCE verifier, kept in an encrypted, short-lived cookie between
/auth/login and /auth/callback. SameSite=Lax: the callback arrives by a cross-site redirect
from the provider, on which Strict cookies are not sent.

The cookie is a compact JWE (alg "dir", enc "A256GCM": AES-256-GCM, authenticated encryption)
under a key derived from DLW_SYSTEM_JWT_SECRET for this purpose only. Whoever sees the cookie
(a browser extension, a log, a proxy) learns nothing of the state, nonce or verifier, and a
changed byte, another key or an expired cookie is refused."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwe import JWERegistry
from joserfc.jwk import OctKey

COOKIE = "dlw_login"
COOKIE_PATH = "/api/v1/auth"
MAX_AGE = 600
HEADER = {"alg": "dir", "enc": "A256GCM", "typ": "dlw-login"}
# Only direct AES-256-GCM encryption: a signed-only (JWS) or otherwise protected cookie is refused.
_REGISTRY = JWERegistry(algorithms=["dir", "A256GCM"])


@dataclass(frozen=True)
class LoginState:
    state: str
    nonce: str
    code_verifier: str


def _key(secret: str) -> OctKey:
    # A 256-bit key of its own, derived from the system secret, so a cookie is never a valid JWT
    # and the system JWT key never encrypts anything.
    return OctKey.import_key(hashlib.sha256(b"dlw-login-state-enc\0" + secret.encode()).digest())


def seal(secret: str, value: LoginState, *, now: int | None = None) -> str:
    """Encrypt the state for MAX_AGE seconds from now (now: a Unix time, for tests)."""
    issued = int(time.time()) if now is None else now
    claims = {"st": value.state, "nc": value.nonce, "cv": value.code_verifier, "iat": issued, "exp": issued + MAX_AGE}
    return jwt.encode(HEADER, claims, _key(secret), registry=_REGISTRY, default_type=None)


def unseal(secret: str, cookie: str) -> LoginState | None:
    """The state in a cookie we encrypted and that has not expired, or None."""
    try:
        token = jwt.decode(cookie, _key(secret), registry=_REGISTRY)
        if token.header.get("typ") != HEADER["typ"]:
            return None
        jwt.JWTClaimsRegistry(exp={"essential": True}).validate(token.claims)
        claims = token.claims
        return LoginState(state=str(claims["st"]), nonce=str(claims["nc"]), code_verifier=str(claims["cv"]))
    except (JoseError, KeyError, ValueError, TypeError):
        return None

"""The login's state, nonce and PKCE verifier, kept in a signed, short-lived cookie between
/auth/login and /auth/callback. SameSite=Lax: the callback arrives by a cross-site redirect
from the provider, on which Strict cookies are not sent."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

COOKIE = "dlw_login"
COOKIE_PATH = "/api/v1/auth"
MAX_AGE = 600


@dataclass(frozen=True)
class LoginState:
    state: str
    nonce: str
    code_verifier: str


def _key(secret: str) -> OctKey:
    # A key of its own, derived from the system secret, so a cookie is never a valid JWT.
    return OctKey.import_key(hashlib.sha256(b"dlw-login-state\0" + secret.encode()).digest())


def seal(secret: str, value: LoginState) -> str:
    now = int(time.time())
    claims = {"st": value.state, "nc": value.nonce, "cv": value.code_verifier, "iat": now, "exp": now + MAX_AGE}
    return jwt.encode({"alg": "HS256", "typ": "dlw-login"}, claims, _key(secret), algorithms=["HS256"])


def unseal(secret: str, cookie: str) -> LoginState | None:
    """The state in a cookie we sealed and that has not expired, or None."""
    try:
        token = jwt.decode(cookie, _key(secret), algorithms=["HS256"])
        jwt.JWTClaimsRegistry(exp={"essential": True}).validate(token.claims)
        claims = token.claims
        return LoginState(state=str(claims["st"]), nonce=str(claims["nc"]), code_verifier=str(claims["cv"]))
    except (JoseError, KeyError, ValueError, TypeError):
        return None

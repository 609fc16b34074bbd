"""The system JWT: short-lived HS256 tokens minted by DLW itself after a login (or by
`dlw token issue`). Every claim is required; only HS256 is accepted."""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import lru_cache

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from app.domain import ROLES
from app.identity.principal import Principal

ISSUER = "dlw-controller"
ALGORITHMS = ["HS256"]
_REQUIRED = ("iss", "sub", "tid", "role", "pids", "iat", "exp")


class InvalidToken(Exception):
    """Any reason a token is not accepted; the reason is logged, never sent to the client."""


LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 10_000


@lru_cache(maxsize=8)
def _key(secret: str) -> OctKey:
    return OctKey.import_key(secret.encode())


# Verified tokens, keyed by (secret, token): a client sends the same token on every request,
# and checking an HMAC and seven claims each time is most of the request's authentication
# cost. A hit still re-checks expiry; the cache is bounded and forgets the oldest first.
_verified: OrderedDict[tuple[str, str], tuple[Principal, int]] = OrderedDict()


def issue(secret: str, principal: Principal, ttl_seconds: int, *, now: int | None = None) -> str:
    issued = int(time.time()) if now is None else now
    claims = {
        "iss": ISSUER,
        "sub": principal.user_id,
        "tid": principal.tenant_id,
        "role": principal.role,
        "pids": list(principal.project_ids),
        "svc": principal.is_service,
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    return jwt.encode({"alg": "HS256"}, claims, _key(secret), algorithms=ALGORITHMS)


def decode(secret: str, token: str) -> Principal:
    key = (secret, token)
    hit = _verified.get(key)
    if hit is not None:
        principal, expires = hit
        if time.time() < expires + LEEWAY_SECONDS:
            return principal
        del _verified[key]
        raise InvalidToken("system JWT rejected: ExpiredTokenError")
    principal, expires = _verify(secret, token)
    _verified[key] = (principal, expires)
    if len(_verified) > VERIFIED_CACHE_SIZE:
        _verified.popitem(last=False)
    return principal


def _verify(secret: str, token: str) -> tuple[Principal, int]:
    try:
        parsed = jwt.decode(token, _key(secret), algorithms=ALGORITHMS)
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY_SECONDS,
            iss={"essential": True, "value": ISSUER},
            # pids is checked below: joserfc counts an empty list as a missing essential claim.
            **{name: {"essential": True} for name in _REQUIRED if name not in ("iss", "pids")},  # type: ignore[arg-type]
        )
        registry.validate(parsed.claims)
        if "pids" not in parsed.claims:
            raise ValueError("missing pids")
    except (JoseError, ValueError, TypeError) as exc:
        raise InvalidToken(f"system JWT rejected: {exc.__class__.__name__}") from exc
    claims = parsed.claims
    tid, role, pids, sub = claims["tid"], claims["role"], claims["pids"], claims["sub"]
    if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0 or (tid == 0 and role != "executor"):
        raise InvalidToken("system JWT rejected: tid")  # 0 = all tenants, for executors only
    if role not in ROLES or not isinstance(sub, str) or not sub:
        raise InvalidToken("system JWT rejected: role/sub")
    if not isinstance(pids, list) or not all(isinstance(p, str) for p in pids):
        raise InvalidToken("system JWT rejected: pids")
    principal = Principal(
        user_id=sub,
        tenant_id=tid,
        role=role,
        project_ids=tuple(pids),
        is_service=bool(claims.get("svc", False)),
    )
    return principal, int(claims["exp"])

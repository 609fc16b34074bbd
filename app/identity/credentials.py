"""Authentication: every request with credentials resolves to exactly one Principal, or 401.

Accepted bearer tokens, tried in this order:
1. the service token (DLW_SYSTEM_ADMIN_TOKEN), compared in constant time -> system_admin;
2. a system JWT (HS256, minted by DLW) -> the principal in its claims;
3. a JWT access token of the configured identity provider (asymmetric algorithms, typ at+jwt)
   -> the service account registered for its client.
A system_admin may act in another tenant by naming it in the X-DLW-Tenant header.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from joserfc import jws
from joserfc.errors import JoseError

from app.api.errors import ApiError, unauthenticated
from app.config import Settings
from app.domain import PLATFORM_TENANT_ID
from app.identity import system_jwt
from app.identity.oidc import ALGORITHMS, OidcClient, OidcTokenError, OidcUpstreamError
from app.identity.principal import Principal

log = logging.getLogger("dlw.auth")

MAX_TOKEN_BYTES = 8192
TENANT_HEADER = "x-dlw-tenant"


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthenticated()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token.encode()) > MAX_TOKEN_BYTES:
        raise unauthenticated()
    return token


def _unverified_alg(token: str) -> str | None:
    try:
        alg = jws.extract_compact(token.encode()).headers().get("alg")
    except (JoseError, ValueError, UnicodeError):
        return None
    return alg if isinstance(alg, str) else None


async def _service_account(request: Request, oidc: OidcClient, token: str) -> Principal:
    try:
        claims = await oidc.verify_access_token(token)
    except OidcUpstreamError as exc:
        log.warning("access token not checked, provider unavailable: %s", exc)
        raise ApiError(503, "OIDC_UPSTREAM", headers={"Retry-After": "5"}) from exc
    client = claims.get("client_id") or claims.get("sub")
    if not isinstance(client, str):
        raise OidcTokenError("access token names no client")
    rows = await request.app.state.pool.fetch("SELECT * FROM dlw.find_service_account($1, $2)", oidc.issuer, client)
    if len(rows) != 1 or not rows[0]["tenant_active"]:
        raise OidcTokenError(f"client {client!r}: {len(rows)} service accounts (or tenant inactive)")
    row = rows[0]
    return Principal(user_id=f"sa:{row['account_id']}", tenant_id=row["tenant_id"], role=row["role"], is_service=True)


async def _principal_from_token(request: Request, settings: Settings, token: str) -> Principal:
    if settings.system_admin_token and hmac.compare_digest(token.encode(), settings.system_admin_token.encode()):
        return Principal(
            user_id="service:system-admin", tenant_id=PLATFORM_TENANT_ID, role="system_admin", is_service=True
        )
    alg = _unverified_alg(token)
    if alg == "HS256":
        return system_jwt.decode(settings.system_jwt_secret, token)
    oidc: OidcClient | None = getattr(request.app.state, "oidc", None)
    if alg in ALGORITHMS and oidc is not None:
        return await _service_account(request, oidc, token)
    raise system_jwt.InvalidToken(f"unsupported token (alg {alg!r})")


async def _in_named_tenant(request: Request, principal: Principal) -> Principal:
    ref = request.headers.get(TENANT_HEADER)
    if ref is None:
        return principal
    if principal.role != "system_admin":
        raise ApiError(403, "TENANT_HEADER_FORBIDDEN")
    row = await request.app.state.pool.fetchrow("SELECT * FROM dlw.resolve_tenant($1)", ref.strip())
    if row is None:
        raise ApiError(404, "TENANT_NOT_FOUND")
    return Principal(
        user_id=principal.user_id,
        tenant_id=row["tenant_id"],
        role=principal.role,
        project_ids=(),
        is_service=principal.is_service,
    )


async def current_principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated principal, or a 401 that says nothing more."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    settings: Settings = request.app.state.settings
    token = _bearer(request)
    try:
        principal = await _principal_from_token(request, settings, token)
    except (system_jwt.InvalidToken, OidcTokenError) as exc:
        log.info("401 on %s %s: %s", request.method, request.url.path, exc)
        raise unauthenticated() from exc
    principal = await _in_named_tenant(request, principal)
    request.state.principal = principal
    return principal

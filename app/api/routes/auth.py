"""/api/v1/auth: login through the identity provider (or dev mode), and who am I."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from authlib.common.security import generate_token
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel

from app.api.openapi_document import enum_field
from app.api.openapi_errors import error_responses
from app.api.refusals import (
    OIDC_INVALID_CODE,
    OIDC_NONCE_MISMATCH,
    OIDC_NOT_CONFIGURED,
    OIDC_PROVIDER_ERROR,
    OIDC_STATE_MISMATCH,
    OIDC_UPSTREAM,
    answer_of,
)
from app.authz.require import PermissionFirstRoute, require_perm
from app.config import Settings
from app.db.queries import SQL
from app.domain import ROLES
from app.identity import login_state, system_jwt
from app.identity.oidc import OidcClient, OidcNonceMismatch, OidcTokenError, OidcUpstreamError, email_claim
from app.identity.principal import Principal
from app.identity.tenant_rules import first_match

log = logging.getLogger("dlw.auth")
router = APIRouter(prefix="/api/v1/auth", tags=["auth"], route_class=PermissionFirstRoute)

DEV_ISSUER = "dev"
DEV_CODE_PREFIX = "dev:"


class LoginResult(BaseModel):
    system_jwt: str
    expires_in: int
    tenant_id: int
    role: str = enum_field(ROLES)


class Me(BaseModel):
    user_id: str
    tenant_id: int
    role: str = enum_field(ROLES)
    project_ids: list[str]
    is_service: bool


def _oidc(request: Request) -> OidcClient:
    oidc: OidcClient | None = getattr(request.app.state, "oidc", None)
    if oidc is None or not oidc.client_id or not oidc.redirect_url:
        raise OIDC_NOT_CONFIGURED.error()
    return oidc


@router.get(
    "/login",
    operation_id="startLogin",
    response_class=RedirectResponse,
    status_code=302,
    responses=error_responses(OIDC_NOT_CONFIGURED, OIDC_UPSTREAM, authenticated=False, database=False),
)
async def login(request: Request, email: str = Query("dev@local", max_length=254)) -> RedirectResponse:
    """Redirect to the identity provider; in dev mode, straight to the callback."""
    settings: Settings = request.app.state.settings
    state = generate_token(32)
    if settings.auth_dev_mode:
        query = urlencode({"code": DEV_CODE_PREFIX + email, "state": state})
        response = RedirectResponse(f"{request.url_for('callback').path}?{query}", status_code=302)
    else:
        oidc = _oidc(request)
        nonce, verifier = generate_token(32), generate_token(64)
        try:
            url = await oidc.authorization_url(state, nonce, verifier)
        except OidcUpstreamError as exc:
            log.warning("login: provider unavailable: %s", exc)
            raise OIDC_UPSTREAM.error() from exc
        response = RedirectResponse(url, status_code=302)
        response.set_cookie(
            login_state.COOKIE,
            login_state.seal(settings.system_jwt_secret, login_state.LoginState(state, nonce, verifier)),
            max_age=login_state.MAX_AGE,
            path=login_state.COOKIE_PATH,
            httponly=True,
            samesite="lax",
            secure=str(oidc.redirect_url).startswith("https://"),
        )
    return response


async def _verified_identity(request: Request, settings: Settings, code: str, state: str | None) -> dict[str, Any]:
    """The claims of the person who just logged in, verified end to end."""
    if code.startswith(DEV_CODE_PREFIX):
        if not settings.auth_dev_mode:
            raise OIDC_INVALID_CODE.error()
        email = code[len(DEV_CODE_PREFIX) :].strip().lower()
        return {"iss": DEV_ISSUER, "sub": email, "email": email, "email_verified": True, "groups": []}
    oidc = _oidc(request)
    cookie = request.cookies.get(login_state.COOKIE)
    saved = login_state.unseal(settings.system_jwt_secret, cookie) if cookie else None
    if saved is None or not state or not _same(saved.state, state):
        raise OIDC_STATE_MISMATCH.error()
    try:
        id_token = await oidc.exchange_code(code, saved.code_verifier)
        claims = await oidc.verify_id_token(id_token, saved.nonce)
    except OidcUpstreamError as exc:
        log.warning("callback: provider unavailable: %s", exc)
        raise OIDC_UPSTREAM.error() from exc
    except OidcNonceMismatch as exc:
        log.info("callback: %s", exc)
        raise OIDC_NONCE_MISMATCH.error() from exc
    except OidcTokenError as exc:
        log.info("callback: %s", exc)
        raise OIDC_INVALID_CODE.error() from exc
    return claims


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


@router.get(
    "/callback",
    operation_id="finishLogin",
    response_model=LoginResult,
    responses=error_responses(
        "dlw.login_user",
        OIDC_PROVIDER_ERROR,
        OIDC_INVALID_CODE,
        OIDC_STATE_MISMATCH,
        OIDC_NONCE_MISMATCH,
        OIDC_NOT_CONFIGURED,
        OIDC_UPSTREAM,
        authenticated=False,
    ),
)
async def callback(
    request: Request,
    code: str | None = Query(None, max_length=4096),
    state: str | None = Query(None, max_length=512),
    error: str | None = Query(None, max_length=200),
) -> JSONResponse:
    """Finish the login: verify the identity, place the user in a tenant, mint a system JWT."""
    settings: Settings = request.app.state.settings
    if error or not code:
        raise (OIDC_PROVIDER_ERROR if error else OIDC_INVALID_CODE).error()
    claims = await _verified_identity(request, settings, code, state)
    email, email_verified = email_claim(claims)
    raw_groups = claims.get("groups")
    groups = [g for g in raw_groups if isinstance(g, str)] if isinstance(raw_groups, list) else []
    rule = first_match(request.app.state.tenant_rules, email, email_verified, groups)
    row = await request.app.state.pool.fetchrow(
        SQL["login_user"],
        str(claims["iss"]),
        str(claims["sub"]),
        email,
        email_verified,  # dlw.login_user keeps the email only when this is true
        rule.tenant if rule else None,
        rule.role if rule else None,
    )
    answer_of("dlw.login_user", row)
    principal = Principal(user_id=str(row["user_id"]), tenant_id=row["tenant_id"], role=row["role"])
    ttl = settings.system_jwt_ttl_seconds
    token = system_jwt.issue(settings.system_jwt_secret, principal, ttl)
    body = LoginResult(system_jwt=token, expires_in=ttl, tenant_id=principal.tenant_id, role=principal.role)
    response = JSONResponse(body.model_dump(), headers={"Cache-Control": "no-store"})
    response.delete_cookie(login_state.COOKIE, path=login_state.COOKIE_PATH)
    return response


@router.get("/me", response_model=Me, operation_id="getMe", responses=error_responses(database=False))
async def me(principal: Principal = Depends(require_perm("/api/v1/auth/me", "GET"))) -> Me:
    """The calling principal."""
    return Me(**principal.as_dict())  # type: ignore[arg-type]

"""require_perm: the permission check every route (but health and login) declares."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import asyncpg
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from app.api.errors import ApiError
from app.api.sqlstates import UNAVAILABLE_ERRORS, CommitUncertain
from app.api.strict_input import check_request
from app.db.pool import audit_repeat, tenant_transaction
from app.domain import PLATFORM_TENANT_ID
from app.identity.credentials import current_principal
from app.identity.principal import Principal

log = logging.getLogger("dlw.authz")

PermissionDependency = Callable[..., Awaitable[Principal]]


async def audit_denial(request: Request, principal: Principal, obj: str, act: str) -> None:
    """Count the denial on the permission_denied row in its own transaction, committed before
    the 403 is sent, so nothing that happens to the request afterwards can lose it. Repeats of
    one principal on one route in one minute share a row (its count grows): a flood of denials
    adds O(1) rows, not one each."""
    tenant = principal.tenant_id or PLATFORM_TENANT_ID  # system-wide executors have no tenant
    detail = {"role": principal.role, "method": request.method, "path": request.url.path}
    try:
        async with tenant_transaction(
            request.app.state.pool,
            tenant,
            principal.user_id,
            principal.role,
            acquire_timeout=request.app.state.settings.db_acquire_timeout_seconds,
        ) as conn:
            await audit_repeat(conn, "permission_denied", f"{act} {obj}", detail)
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError, CommitUncertain):
        log.exception("could not audit a permission denial: %s %s by %s", act, obj, principal.user_id)


def require_perm(obj: str, act: str, *, tenant_path_param: str | None = None) -> PermissionDependency:
    """A dependency that returns the principal, acting with the most privileged of its roles
    that allows `act` on `obj`, or answers 403 RBAC_DENIED (and audits the denial).

    obj is the route's path template, act its method. The resource belongs to the principal's
    tenant (row-level security sees to that), except on routes that name a tenant in the path
    (tenant_path_param)."""

    async def check(request: Request, principal: Principal = Depends(current_principal)) -> Principal:
        authorized: Principal | None = getattr(request.state, "authorized", None)
        if authorized is not None:  # PermissionFirstRoute already decided, before the body was read
            return authorized
        same_tenant = True
        if tenant_path_param is not None:
            same_tenant = str(request.path_params.get(tenant_path_param)) == str(principal.tenant_id)
        role = request.app.state.authz.acting_role(principal, obj, act, same_tenant)
        if role is None:
            await audit_denial(request, principal, obj, act)
            raise ApiError(403, "RBAC_DENIED")
        decided = principal if role == principal.role else replace(principal, role=role)
        request.state.authorized = decided
        return decided

    check.dlw_permission = (obj, act)  # type: ignore[attr-defined]  # read by the route-matrix test
    return check


class PermissionFirstRoute(APIRoute):
    """Authenticate and authorize before FastAPI reads and validates the body, so an
    unauthorized caller gets 401/403 (and an audit row) whatever it sent."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks: list[PermissionDependency] = [
            d.call for d in self.dependant.dependencies if d.call is not None and hasattr(d.call, "dlw_permission")
        ]
        if not checks:

            async def strict_handler(request: Request) -> Response:
                await check_request(request)
                return await handler(request)

            return strict_handler
        check = checks[0]

        async def authorized_handler(request: Request) -> Response:
            await check(request, await current_principal(request))
            await check_request(request)  # strict input (app/api/strict_input.py), after the 401/403
            return await handler(request)

        return authorized_handler

"""The tenant's Hugging Face Hub token: set (again = rotate), clear, and whether one is set.

Write-only: no route returns the token. It is encrypted here (app/api/hub_secrets.py) before it
reaches the database, used by task creation to ask the hub, and handed to an executor only with
a claim of this tenant's files. tenant_admin only (casbin, and the table's policies)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api import hub_secrets
from app.api.hub import unavailable
from app.api.openapi_errors import error_responses
from app.api.transaction import call_for_outcome, request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.config import Settings
from app.db.queries import SQL
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["hub token"], route_class=PermissionFirstRoute)


class HubTokenSet(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # Visible ASCII only: it becomes an Authorization header.
    token: str = Field(min_length=1, max_length=1000, pattern=r"^[\x21-\x7e]+$", description="never returned")


class HubTokenStatus(BaseModel):
    set: bool
    set_at: datetime | None
    set_by: str | None


class HubTokenOutcome(BaseModel):
    outcome: str = Field(description="set | rotated")


@router.put("/hub-token", response_model=HubTokenOutcome, responses=error_responses("dlw.set_hub_token"))
async def set_hub_token(
    request: Request, body: HubTokenSet, principal: Principal = Depends(require_perm("/api/v1/hub-token", "PUT"))
) -> HubTokenOutcome:
    """Store the tenant's hub token (encrypted), replacing any previous one."""
    settings: Settings = request.app.state.settings
    try:
        key = hub_secrets.key_of(settings.secret_key, settings.auth_dev_mode)
    except hub_secrets.SecretKeyMissing as exc:  # the startup guard makes this unreachable outside dev mode
        raise unavailable(None, "DLW_SECRET_KEY is not set") from exc
    sealed = hub_secrets.seal(key, principal.tenant_id, body.token)
    outcome, _ = await call_for_outcome(request, principal, "dlw.set_hub_token", SQL["set_hub_token"], sealed)
    return HubTokenOutcome(outcome=outcome)


@router.delete("/hub-token", status_code=204, response_class=Response, responses=error_responses("dlw.clear_hub_token"))
async def clear_hub_token(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/hub-token", "DELETE"))
) -> Response:
    """Remove the tenant's hub token (gated repositories are then refused)."""
    await call_for_outcome(request, principal, "dlw.clear_hub_token", SQL["clear_hub_token"])
    return Response(status_code=204)


@router.get("/hub-token", response_model=HubTokenStatus, responses=error_responses())
async def hub_token_status(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/hub-token", "GET"))
) -> HubTokenStatus:
    """Whether the tenant has a hub token, when and by whom it was set (never the token)."""
    async with request_transaction(request, principal) as conn:
        row = await conn.fetchrow(SQL["hub_token_status"])
    assert row is not None  # the function always answers one row
    return HubTokenStatus(set=row["is_set"], set_at=row["set_at"], set_by=row["set_by"])

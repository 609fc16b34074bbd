"""The tenant's quota: limits and exact usage now."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from app.api.openapi_errors import error_responses
from app.api.refusals import found
from app.api.transaction import request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)


class Quota(BaseModel):
    tenant_id: int
    period: str
    bytes_used_month: int
    bytes_quota_month: int
    storage_gb_used: int = Field(
        description="storage_bytes_used in GB (10^9 bytes), rounded up: a tenant storing 1 byte uses 1 GB"
    )
    storage_gb_quota: int
    concurrent_tasks: int
    concurrent_quota: int
    snapshot_refreshed_at: datetime | None
    snapshot_age_seconds: float | None
    bytes_reserved: int = Field(description="declared bytes of unfinished files: admission counts used + reserved")
    tasks_last_minute: int
    tasks_per_minute_quota: int
    storage_targets: int
    storage_targets_quota: int
    storage_bytes_used: int = Field(
        description="bytes of the distinct contents your storage targets hold (each once per target, however"
        " many files use it): what the storage quota counts as used"
    )
    storage_bytes_reserved: int = Field(
        description="declared bytes of unfinished files whose content the target does not hold yet: admission"
        " counts storage used + reserved + the new task's new contents against storage_gb_quota"
    )


@router.get(
    "/quota/current",
    response_model=Quota,
    operation_id="getCurrentQuota",
    responses=error_responses("dlw.quota_current"),
)
async def quota_current(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/quota/current", "GET"))
) -> Quota:
    """Limits (0 = unlimited) and exact usage now: this UTC month's bytes used and reserved, live
    tasks, tasks created in the last minute, storage targets, storage used."""
    async with request_transaction(request, principal) as conn:
        row = found("dlw.quota_current", await conn.fetchrow(SQL["quota_current"]))
    return Quota(**{**dict(row), "period": row["period"].isoformat()})

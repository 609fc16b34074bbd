"""The executor API for deleting tasks' files (docs/storage.md, "Deleting"): claim deletions
under a lease, heartbeat, complete or fail them. As for files (app/api/routes/executor.py), each
route runs one transaction in the executor's context and calls one SECURITY DEFINER function
(sql/44_executor_deletions.sql) that takes the executor's scope from that context: a
tenant-limited executor never sees or reports another tenant's deletion (404)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.openapi_document import enum_field
from app.api.openapi_errors import error_responses
from app.api.refusals import REGISTRY
from app.api.routes.executor import ExecutorLabel, LeaseBody, LeaseSeconds, lease_of, report, report_route
from app.api.transaction import request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.domain import CLAIM_MAX_FILES, STORAGE_LAYOUTS
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1/executor", tags=["executor"], route_class=PermissionFirstRoute)


class DeletionClaimRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"max_deletions": 2, "lease_seconds": 120, "executor": "worker-1"}]},
    )
    max_deletions: int = Field(1, ge=1, le=CLAIM_MAX_FILES)
    lease_seconds: LeaseSeconds = 60
    executor: ExecutorLabel = None


class PlannedFile(BaseModel):
    id: uuid.UUID = Field(description="the file's id: its partial download is named after it and removed too")
    path: str
    sha256: str | None
    size: int
    remove_path: bool = Field(description="remove the file (tree) or its snapshot entry (hf-cache)")
    remove_blob: bool = Field(description="hf-cache: remove the blob the snapshot entry points to")


class Plan(BaseModel):
    layout: str = enum_field(STORAGE_LAYOUTS)
    root: str | None = Field(description="the target's root (null: the executor's default storage, under <tenant>/)")
    repo_type: str
    repo_id: str
    revision: str
    commit: str | None
    remove_ref: bool = Field(description="hf-cache: remove refs/<revision> if it still names this commit")
    files: list[PlannedFile]


class ClaimedDeletion(BaseModel):
    id: uuid.UUID
    task_id: uuid.UUID
    tenant_id: int
    tenant: str = Field(description="tenant slug (the default storage's directory)")
    attempt: int
    assignment_token: uuid.UUID
    lease_seconds: int
    lease_expires_at: datetime
    plan: Plan = Field(description="what to remove, decided by the database when claimed")


class DeletionClaimResponse(BaseModel):
    deletions: list[ClaimedDeletion]


class DeletionFailBody(LeaseBody):
    error: str = Field(min_length=1, max_length=2000)
    retryable: bool = False


class DeletionHeartbeat(BaseModel):
    lease_expires_at: datetime


class Released(BaseModel):
    storage_target_id: uuid.UUID
    sha256: str | None
    bytes: int


class DeletionReport(BaseModel):
    outcome: str = enum_field(
        REGISTRY["dlw.executor_deletion_complete"].success | REGISTRY["dlw.executor_deletion_fail"].success
    )
    released_bytes: int | None = None
    released: list[Released] | None = None


@router.post(
    "/deletions/claim",
    response_model=DeletionClaimResponse,
    operation_id="claimDeletions",
    responses=error_responses("dlw.executor_claim_deletions"),
)
async def claim_deletions(
    request: Request,
    body: DeletionClaimRequest,
    principal: Principal = Depends(require_perm("/api/v1/executor/deletions/claim", "POST")),
) -> DeletionClaimResponse:
    """Claim up to max_deletions task deletions (possibly none) of the tenants the token covers,
    fairly across tenants (oldest first within one), each with its plan."""
    max_attempts = request.app.state.settings.executor_max_attempts
    async with request_transaction(request, principal, "dlw.executor_claim_deletions") as conn:
        rows = await conn.fetch(
            SQL["executor_claim_deletions"], body.max_deletions, body.lease_seconds, body.executor, max_attempts
        )
    return DeletionClaimResponse(
        deletions=[
            ClaimedDeletion(
                id=r["deletion_id"],
                **lease_of(r),
                plan=Plan.model_validate_json(r["plan"]),
            )
            for r in rows
        ]
    )


@report_route(
    router, "/deletions/{deletion_id}/heartbeat", DeletionHeartbeat, "heartbeatDeletion", "executor_deletion_heartbeat"
)
async def heartbeat_deletion(
    request: Request,
    deletion_id: uuid.UUID,
    body: LeaseBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/deletions/{deletion_id}/heartbeat", "POST")),
) -> DeletionHeartbeat:
    """Extend the deletion's lease; 409 LEASE_LOST means stop."""
    _, row = await report(
        request, principal, "executor_deletion_heartbeat", SQL["executor_deletion_heartbeat"], deletion_id, body
    )
    return DeletionHeartbeat(lease_expires_at=row["lease_expires_at"])


@report_route(
    router, "/deletions/{deletion_id}/complete", DeletionReport, "completeDeletion", "executor_deletion_complete"
)
async def complete_deletion(
    request: Request,
    deletion_id: uuid.UUID,
    body: LeaseBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/deletions/{deletion_id}/complete", "POST")),
) -> DeletionReport:
    """Report the plan carried out: the task is deleted and the storage it alone used released."""
    outcome, row = await report(
        request, principal, "executor_deletion_complete", SQL["executor_deletion_complete"], deletion_id, body
    )
    return DeletionReport(
        outcome=outcome,
        released_bytes=row["released_bytes"],
        released=[Released(**item) for item in _json(row["released"])],
    )


@report_route(router, "/deletions/{deletion_id}/fail", DeletionReport, "failDeletion", "executor_deletion_fail")
async def fail_deletion(
    request: Request,
    deletion_id: uuid.UUID,
    body: DeletionFailBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/deletions/{deletion_id}/fail", "POST")),
) -> DeletionReport:
    """Report a failure: a retryable one requeues the deletion (after a backoff) while it has
    attempts left; otherwise the task shows deletion failed."""
    max_attempts = request.app.state.settings.executor_max_attempts
    outcome, _ = await report(
        request,
        principal,
        "executor_deletion_fail",
        SQL["executor_deletion_fail"],
        deletion_id,
        body,
        body.error,
        body.retryable,
        max_attempts,
    )
    return DeletionReport(outcome=outcome)


def _json(value: Any) -> list[dict[str, Any]]:
    """A jsonb column as asyncpg returns it (text, unless a codec is set)."""
    return list(json.loads(value)) if isinstance(value, str) else list(value or [])

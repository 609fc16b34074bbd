"""Many executor reports in one request and one transaction: completions and heartbeats of small
files, where a request per file would cost more than the file (dlw.executor_report_batch). Each
item is answered with the outcome code the single-file route would give (docs/errors.md), and a
refused item changes nothing while the others apply."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.openapi_errors import error_responses
from app.api.refusals import REGISTRY
from app.api.routes.executor import CompleteBody, HeartbeatBody
from app.api.transaction import request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.domain import CLAIM_MAX_FILES
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1/executor", tags=["executor"], route_class=PermissionFirstRoute)


class FileCompletion(CompleteBody):
    file_id: uuid.UUID = Field(strict=False)


class FileHeartbeat(HeartbeatBody):
    file_id: uuid.UUID = Field(strict=False)


class ReportBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    completions: list[FileCompletion] = Field(default_factory=list, max_length=CLAIM_MAX_FILES)
    heartbeats: list[FileHeartbeat] = Field(default_factory=list, max_length=CLAIM_MAX_FILES)


class ReportResult(BaseModel):
    file_id: uuid.UUID
    action: str = Field(description="complete | heartbeat")
    outcome: str = Field(description="what the single-file route answers: its success outcome or error code")
    task_status: str | None
    lease_expires_at: datetime | None


class ReportBatchResponse(BaseModel):
    results: list[ReportResult]


_CALLS = {"complete": "dlw.executor_complete", "heartbeat": "dlw.executor_heartbeat"}


def _answer(action: str, outcome: str) -> str:
    """The single-file route's answer for a SQL outcome: a success outcome, or its error code.
    Anything unlisted fails closed, as answer_of does for one report."""
    answers = REGISTRY[_CALLS[action]]
    if outcome in answers.success:
        return outcome
    if outcome in answers.refusals:
        return answers.refusals[outcome].code
    raise RuntimeError(f"dlw.executor_report_batch answered an unlisted {action} outcome {outcome!r}")


@router.post("/reports", response_model=ReportBatchResponse, responses=error_responses("dlw.executor_report_batch"))
async def report_batch(
    request: Request,
    body: ReportBatch,
    principal: Principal = Depends(require_perm("/api/v1/executor/reports", "POST")),
) -> ReportBatchResponse:
    """Complete and heartbeat many files at once (at most claim_max_files items in all)."""
    completions = [
        {
            "file_id": str(c.file_id),
            "assignment_token": str(c.assignment_token),
            "bytes": c.bytes,
            "sha256": c.sha256.lower(),
            "stored_path": c.stored_path,
        }
        for c in body.completions
    ]
    heartbeats = [
        {
            "file_id": str(h.file_id),
            "assignment_token": str(h.assignment_token),
            "bytes_done": h.bytes_done,
            "checkpoint_bytes": h.checkpoint_bytes,
            "checkpoint_sha256": h.checkpoint_sha256,
        }
        for h in body.heartbeats
    ]
    async with request_transaction(request, principal, "dlw.executor_report_batch") as conn:
        rows = await conn.fetch(SQL["executor_report_batch"], json.dumps(completions), json.dumps(heartbeats))
    return ReportBatchResponse(
        results=[ReportResult(**{**dict(r), "outcome": _answer(r["action"], r["outcome"])}) for r in rows]
    )

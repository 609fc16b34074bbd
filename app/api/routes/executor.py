"""The executor API: claim files under a lease, heartbeat, complete, fail or release them.

Executors hold `executor` tokens, limited to one tenant or system-wide (tid 0). Each route runs
one transaction in the executor's context (dlw.set_context(<tid>, <subject>, 'executor'),
exactly like every other route) and calls one SECURITY DEFINER function of sql/40_executor.sql.
Those functions cross tenants (owned by dlw_system), so isolation does not come from row-level
security here but from the functions themselves: they take the executor's scope from that
context (tid 0 = every tenant), refuse any other role, and never read or change a file outside
the scope. The context is set only by the API from a verified token, and only dlw_app may
EXECUTE the functions; casbin admits only the executor role to these routes in the first place.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api import hub_secrets
from app.api.openapi_document import enum_field
from app.api.openapi_errors import error_responses
from app.api.queue_wakeup import MIN_CLAIM_GAP_SECONDS, WAIT_SECONDS_MAX
from app.api.refusals import REGISTRY
from app.api.transaction import call_for_outcome, request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.domain import CLAIM_MAX_FILES, LEASE_SECONDS_MAX, LEASE_SECONDS_MIN, RETRY_AFTER_MAX_SECONDS, TASK_STATUSES
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1/executor", tags=["executor"], route_class=PermissionFirstRoute)

# One segment of a relative stored path, as the database's one rule checks it (dlw.stored_path_ok,
# migrations/0032): not empty, not . or .., no control character (C0, DEL, C1). Spelled without
# look-arounds for the schema; tests/sql/test_stored_path_rule.py feeds both the same samples.
_CHAR = r"[^/\x00-\x1f\x7f-\x9f]"
_NODOT = r"[^/.\x00-\x1f\x7f-\x9f]"
_SEGMENT = rf"(?:{_NODOT}{_CHAR}*|\.{_NODOT}{_CHAR}*|\.\.{_CHAR}+)"

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex sha256 of the content")]


# What every claim (of files, of deletions) asks for its leases.
LeaseSeconds = Annotated[
    int,
    Field(
        ge=LEASE_SECONDS_MIN, le=LEASE_SECONDS_MAX, description="lease length; every heartbeat extends it by as much"
    ),
]
ExecutorLabel = Annotated[
    str | None,
    Field(max_length=100, pattern=r"^[A-Za-z0-9_.:@/-]+$", description="instance label, recorded with the lease"),
]


class ClaimRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"max_files": 4, "lease_seconds": 120, "executor": "worker-1"}]},
    )
    max_files: int = Field(1, ge=1, le=CLAIM_MAX_FILES)
    lease_seconds: LeaseSeconds = 60
    executor: ExecutorLabel = None
    wait_seconds: int = Field(
        0,
        ge=0,
        le=WAIT_SECONDS_MAX,
        description="when nothing is claimable, wait up to this many seconds for files to become so (a long"
        " poll); the answer comes as soon as there are some, or empty once the wait is over",
    )


class ClaimedFile(BaseModel):
    id: uuid.UUID
    task_id: uuid.UUID
    tenant_id: int
    tenant: str = Field(description="tenant slug: without a storage_root, files land in <storage>/<tenant>/...")
    repo_id: str
    repo_type: str = Field(description="model or dataset (dataset files are under /datasets/ on the hub)")
    revision: str
    commit: str | None = Field(description="what to download: the commit the revision resolved to (null: the revision)")
    hub_token: str | None = Field(
        description="the tenant's hub token, for this file's download only (null: none; ask anonymously)"
    )
    path: str
    size: int
    sha256: str | None
    priority: int
    attempt: int
    assignment_token: uuid.UUID
    lease_seconds: int
    lease_expires_at: datetime
    resume_bytes: int = Field(
        description="an earlier attempt's checkpoint: keep a partial file only if its first resume_bytes bytes"
        " hash to resume_sha256, and continue after them (0: start from the beginning)"
    )
    resume_sha256: str | None
    storage_root: str | None = Field(
        description="the task's storage target root (an absolute directory; null: the executor's default"
        " storage, under <tenant>/). An executor that cannot reach it gives the file back (docs/storage.md)"
    )
    storage_layout: str = Field(description="tree (<repo_id>/<revision>/<path>) or hf-cache (the hub cache layout)")
    stored_path: str | None = Field(
        None,
        description="the file's content (its declared sha256) is already stored in this target: a verified copy,"
        " relative to the target's base directory, to place the file from (a hard link) instead of downloading"
        " it (null: download it; docs/storage.md, Deduplication)",
    )


class ClaimResponse(BaseModel):
    files: list[ClaimedFile]


class LeaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    assignment_token: uuid.UUID = Field(strict=False)  # a UUID is a string in JSON


class Checkpoint(LeaseBody):
    """A partial download's resume point: the first checkpoint_bytes bytes are on disk (synced)
    and hash to checkpoint_sha256. Both or neither; the next claim of the file returns them."""

    checkpoint_bytes: int | None = Field(None, ge=0, le=1 << 62)
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class HeartbeatBody(Checkpoint):
    bytes_done: int | None = Field(
        None, ge=0, le=1 << 62, description="bytes downloaded so far; beyond the declared size: 422 SIZE_MISMATCH"
    )


class HeartbeatResponse(BaseModel):
    lease_expires_at: datetime


class CompleteBody(LeaseBody):
    bytes: int = Field(
        ge=0,
        le=1 << 62,
        description="bytes downloaded: must be the file's declared size, which is the usage counted"
        " (another count: 422 SIZE_MISMATCH, the file failed)",
    )
    sha256: Sha256
    stored_path: str | None = Field(
        None,
        max_length=4096,
        pattern=rf"^{_SEGMENT}(?:/{_SEGMENT})*$",
        description="where the file now lies, relative to its target's base directory (tree: <repo_id>/<revision>/"
        "<path>; hf-cache: the snapshot entry; no empty, . or .. segment, no control character): later files of"
        " the same content in the target are placed from it",
    )


class FailBody(LeaseBody):
    error: str = Field(min_length=1, max_length=2000)
    retryable: bool = False
    retry_after_seconds: int | None = Field(
        None,
        ge=0,
        le=(1 << 31) - 1,
        description="the hub's Retry-After, in seconds: a requeued file waits at least this long (at most"
        f" {RETRY_AFTER_MAX_SECONDS} s) before any executor is offered it; the server's exponential backoff"
        " applies when longer",
    )


REPORT_CALLS = ("dlw.executor_complete", "dlw.executor_fail", "dlw.executor_release")


class Report(BaseModel):
    outcome: str = enum_field(frozenset().union(*(REGISTRY[call].success for call in REPORT_CALLS)))
    task_status: str | None = enum_field(TASK_STATUSES, nullable=True, description="the task's status after the report")


def lease_of(row: asyncpg.Record) -> dict[str, Any]:
    """The fields a claimed file and a claimed deletion share: whose work it is and its lease."""
    return {
        "task_id": row["task_id"],
        "tenant_id": row["tenant_id"],
        "tenant": row["tenant_slug"],
        "attempt": row["attempts"],
        "assignment_token": row["assignment_token"],
        "lease_seconds": row["lease_seconds"],
        "lease_expires_at": row["lease_expires_at"],
    }


Route = TypeVar("Route", bound=Callable[..., Any])
T = TypeVar("T")


def report_route(
    router: APIRouter, path: str, response_model: type[BaseModel], operation_id: str, name: str
) -> Callable[[Route], Route]:
    """The POST route of a lease report (of a file or a deletion), documented with the refusals
    of its executor function dlw.<name>."""
    return router.post(
        path, response_model=response_model, operation_id=operation_id, responses=error_responses(f"dlw.{name}")
    )


async def report(
    request: Request, principal: Principal, name: str, query: str, item_id: uuid.UUID, body: LeaseBody, *args: Any
) -> tuple[str, asyncpg.Record]:
    """One lease report (heartbeat, complete, fail, release of a file or a deletion): the executor
    function dlw.<name> (its named query, passed as SQL["<name>"] so that every query name stays a
    literal) called with the item, the lease's token and args in the executor's transaction; its
    listed success outcome and row, a refusal raised after the commit."""
    return await call_for_outcome(request, principal, f"dlw.{name}", query, item_id, body.assignment_token, *args)


async def requeued(request: Request, principal: Principal, done: Awaitable[T]) -> T:
    """A report that may have queued its file again (a release, a retryable failure): once it
    committed, waiting claims look again (app/api/queue_wakeup.py)."""
    result = await done
    request.app.state.queue_wakeup.poke(request.app.state.pool, principal.tenant_id or None)  # 0: any tenant
    return result


# Claims never wait for locks and reports lock a task before its files, so a deadlock is not
# expected; should PostgreSQL still abort one, the registry answers 503 EXECUTOR_RETRY.


@router.post(
    "/claim", response_model=ClaimResponse, operation_id="claimFiles", responses=error_responses("dlw.executor_claim")
)
async def claim(
    request: Request,
    body: ClaimRequest,
    principal: Principal = Depends(require_perm("/api/v1/executor/claim", "POST")),
) -> ClaimResponse:
    """Claim up to max_files files (possibly none), fairly across the tenants the token covers;
    with wait_seconds, an empty claim waits for work and claims again (app/api/queue_wakeup.py)."""
    settings = request.app.state.settings
    wakeup = request.app.state.queue_wakeup
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body.wait_seconds
    while True:
        seen = wakeup.generation
        claimed_at = loop.time()
        async with request_transaction(request, principal, "dlw.executor_claim") as conn:
            rows = await conn.fetch(
                SQL["executor_claim"],
                body.max_files,
                body.lease_seconds,
                body.executor,
                settings.executor_max_attempts,
            )
        # No transaction is held while waiting; a client that left gets no files leased to it.
        if rows or loop.time() >= deadline or await request.is_disconnected():
            break
        await wakeup.wait(seen, deadline - loop.time(), principal.tenant_id or None)
        await asyncio.sleep(max(0.0, claimed_at + MIN_CLAIM_GAP_SECONDS - loop.time()))
    # One decryption per tenant of the claim; the token goes only with that tenant's files.
    tokens = {
        r["tenant_id"]: hub_secrets.opened(settings.secret_key, settings.auth_dev_mode, r["tenant_id"], r["hub_token"])
        for r in rows
        if r["hub_token"] is not None
    }
    return ClaimResponse(
        files=[
            ClaimedFile(
                id=r["file_id"],
                **lease_of(r),
                repo_id=r["repo_id"],
                repo_type=r["repo_type"],
                revision=r["revision"],
                commit=r["commit"],
                hub_token=tokens.get(r["tenant_id"]),
                path=r["path"],
                size=r["size"],
                sha256=r["sha256"],
                priority=r["priority"],
                resume_bytes=r["resume_bytes"],
                resume_sha256=r["resume_sha256"],
                storage_root=r["storage_root"],
                storage_layout=r["storage_layout"],
                stored_path=r["stored_path"],
            )
            for r in rows
        ]
    )


@report_route(router, "/files/{file_id}/heartbeat", HeartbeatResponse, "heartbeatFile", "executor_heartbeat")
async def heartbeat(
    request: Request,
    file_id: uuid.UUID,
    body: HeartbeatBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/files/{file_id}/heartbeat", "POST")),
) -> HeartbeatResponse:
    """Extend the lease (and record progress); 409 LEASE_LOST means stop working on the file."""
    _, row = await report(
        request,
        principal,
        "executor_heartbeat",
        SQL["executor_heartbeat"],
        file_id,
        body,
        body.bytes_done,
        body.checkpoint_bytes,
        body.checkpoint_sha256,
    )
    return HeartbeatResponse(lease_expires_at=row["lease_expires_at"])


@report_route(router, "/files/{file_id}/complete", Report, "completeFile", "executor_complete")
async def complete(
    request: Request,
    file_id: uuid.UUID,
    body: CompleteBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/files/{file_id}/complete", "POST")),
) -> Report:
    """Report the file downloaded; its usage is counted once, however often this is repeated."""
    # Refusals are answered after the commit: a sha256 or size mismatch has failed the file (and task).
    outcome, row = await report(
        request,
        principal,
        "executor_complete",
        SQL["executor_complete"],
        file_id,
        body,
        body.bytes,
        body.sha256.lower(),
        body.stored_path,
    )
    return Report(outcome=outcome, task_status=row["task_status"])


@report_route(router, "/files/{file_id}/fail", Report, "failFile", "executor_fail")
async def fail(
    request: Request,
    file_id: uuid.UUID,
    body: FailBody,
    principal: Principal = Depends(require_perm("/api/v1/executor/files/{file_id}/fail", "POST")),
) -> Report:
    """Report a failure: retryable ones requeue the file while it has attempts left, offered
    again only after a backoff (exponential with jitter, at least retry_after_seconds)."""
    max_attempts = request.app.state.settings.executor_max_attempts
    outcome, row = await requeued(
        request,
        principal,
        report(
            request,
            principal,
            "executor_fail",
            SQL["executor_fail"],
            file_id,
            body,
            body.error,
            body.retryable,
            max_attempts,
            body.retry_after_seconds,
        ),
    )
    return Report(outcome=outcome, task_status=row["task_status"])


@report_route(router, "/files/{file_id}/release", Report, "releaseFile", "executor_release")
async def release(
    request: Request,
    file_id: uuid.UUID,
    body: Checkpoint,
    principal: Principal = Depends(require_perm("/api/v1/executor/files/{file_id}/release", "POST")),
) -> Report:
    """Give the file back (the executor is stopping): queued again, no attempt used, with the
    partial download's checkpoint if any."""
    outcome, _ = await requeued(
        request,
        principal,
        report(
            request,
            principal,
            "executor_release",
            SQL["executor_release"],
            file_id,
            body,
            body.checkpoint_bytes,
            body.checkpoint_sha256,
        ),
    )
    return Report(outcome=outcome, task_status=None)

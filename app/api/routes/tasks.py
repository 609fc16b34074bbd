"""Tasks: create (admitted against the quota by the database), list, read, cancel, retry, delete."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.api import pagination
from app.api.hub import unavailable
from app.api.metrics import count_admission
from app.api.openapi_document import enum_field
from app.api.openapi_errors import error_responses
from app.api.refusals import DUPLICATE_FILE_PATH, FILES_OR_PATTERNS, HUB_REFUSALS, INVALID_CURSOR, answer_of, found
from app.api.task_manifest import Wanted, settle
from app.api.transaction import call_for_outcome, fetch_rows, request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.domain import DELETION_STATUSES, FILE_STATUSES, TASK_DELETION_STATES, TASK_STATUSES
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)

MAX_FILES = 10_000
INT64_MAX = (1 << 63) - 1  # total_bytes is a bigint
# The largest file (about 922 TB): no task of MAX_FILES files can add up beyond a bigint, so the
# schema itself says what a task may total.
MAX_FILE_SIZE = INT64_MAX // MAX_FILES
# These models match with Python's re (their lookaheads), whose "$" also matches before a final
# newline: END refuses one, as "$" alone does in the OpenAPI document's (ECMA-262) reading.
END = r"$(?!\n)"
# A relative POSIX path: no leading "/", no "\\", no empty, "." or ".." segment, no control
# character (C0, DEL, C1: the executor's stored-path rule, dlw.stored_path_ok, refuses them, so
# such a file could never complete). A pattern (not a validator) so the OpenAPI document says
# exactly what is accepted.
SEGMENT = r"(?!\.\.?(?:/|$))[^/\\\x00-\x1f\x7f-\x9f]+"
RELATIVE_PATH = rf"^{SEGMENT}(?:/{SEGMENT})*{END}"
TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]  # = app.domain.TASK_STATUSES (tested)
RepoId = Annotated[str, Field(pattern=rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,95}}/[A-Za-z0-9][A-Za-z0-9._-]{{0,95}}{END}")]
# No ".." segment either (the first character is no dot, every later segment follows a "/").
Revision = Annotated[
    str, Field(min_length=1, max_length=255, pattern=rf"^[A-Za-z0-9](?:[A-Za-z0-9._-]|/(?!\.\.(?:/|$)))*{END}")
]
Limit = Annotated[int, Query(ge=1, le=pagination.MAX_LIMIT)]
RepoType = Literal["model", "dataset"]
Pattern = Annotated[str, Field(min_length=1, max_length=500)]
Patterns = Annotated[list[Pattern], Field(max_length=100)]


class FileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")  # lookaheads
    path: str = Field(min_length=1, max_length=1024, pattern=RELATIVE_PATH, description="a relative POSIX path")
    size: int = Field(ge=0, le=MAX_FILE_SIZE)
    sha256: str | None = Field(None, pattern=rf"^[0-9a-fA-F]{{64}}{END}")

    @field_validator("sha256")
    @classmethod
    def lower_hex(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class TaskCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        regex_engine="python-re",  # the revision pattern's lookahead
        json_schema_extra={
            "examples": [
                {
                    "repo_id": "acme/tiny-model",
                    "revision": "main",
                    "storage_target": "default",
                    "files": [
                        {"path": "config.json", "size": 1024},
                        {
                            "path": "model.safetensors",
                            "size": 104857600,
                            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                        },
                    ],
                    "priority": 0,
                }
            ]
        },
    )
    repo_id: RepoId
    revision: Revision = Field("main", description="branch, tag or commit; the task keeps the commit it resolves to")
    repo_type: RepoType = "model"
    storage_target: str = Field("default", min_length=1, max_length=100, description="id or name")
    include: Patterns | None = Field(
        None, description="glob patterns (huggingface_hub allow_patterns): only matching files; `dir/` = below dir"
    )
    exclude: Patterns | None = Field(None, description="glob patterns (huggingface_hub ignore_patterns) left out")
    files: list[FileSpec] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FILES,
        description="the manifest, when not resolved from the hub; checked against the hub when it answers",
    )
    priority: int = Field(0, ge=-1000, le=1000)
    project_id: uuid.UUID | None = Field(None, strict=False)  # a UUID is a string in JSON

    @model_validator(mode="after")
    def total_fits_a_bigint(self) -> TaskCreate:
        if self.files is None:
            return self
        # guaranteed by MAX_FILE_SIZE; kept as a guard
        if sum(spec.size for spec in self.files) > INT64_MAX:
            raise ValueError("files: the sizes add up to more than 2^63 - 1 bytes")
        return self

    def request_hash(self) -> bytes:
        return hashlib.sha256(self.model_dump_json().encode()).digest()


class TaskFile(BaseModel):
    id: uuid.UUID
    path: str
    size: int
    sha256: str | None
    status: str = enum_field(FILE_STATUSES)
    attempts: int
    bytes_done: int
    error: str | None
    finished_at: datetime | None


class Deletion(BaseModel):
    status: str = enum_field(DELETION_STATUSES, description="the executors' work item")
    attempts: int
    error: str | None
    released_bytes: int | None = Field(description="storage the completed deletion released (bytes)")
    requested_at: datetime
    finished_at: datetime | None


class Task(BaseModel):
    id: uuid.UUID
    project_id: uuid.UUID
    storage_target_id: uuid.UUID
    repo_id: str
    repo_type: str
    revision: str = Field(description="as asked (branch, tag or commit)")
    commit: str | None = Field(
        description="the commit the revision resolved to at creation: what executors download"
        " (null only when the hub could not be asked and the client's files were taken as given)"
    )
    status: str = enum_field(TASK_STATUSES)
    priority: int
    file_count: int
    total_bytes: int
    created_by: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deletion: str | None = enum_field(
        TASK_DELETION_STATES,
        nullable=True,
        default=None,
        description="null: the files are kept; deleting (DELETE asked, an executor removes them), deleted"
        " (removed, their storage released), failed (DELETE again to retry)",
    )
    deleted_at: datetime | None = None
    files: list[TaskFile] | None = None
    deletion_detail: Deletion | None = Field(
        default=None, description="GET /tasks/{id} of a task with a deletion: its work"
    )


class TaskPage(BaseModel):
    items: list[Task]
    next_cursor: str | None


@router.post(
    "/tasks",
    status_code=201,
    response_model=Task,
    responses={
        200: {
            "model": Task,
            "description": "A retry with the same Idempotency-Key and body: the first task, as it is now",
        },
        **error_responses("dlw.create_task", DUPLICATE_FILE_PATH, *HUB_REFUSALS),
    },
)
async def create_task(
    request: Request,
    body: TaskCreate,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="makes the creation safe to retry: the same key and body answer the first task (200),"
        " another body 409 IDEMPOTENCY_CONFLICT",
    ),
    principal: Principal = Depends(require_perm("/api/v1/tasks", "POST")),
) -> JSONResponse:
    """Create a task from a repository name (the hub resolves the revision to a commit and lists
    the files, with include/exclude) or from a files list (checked against the hub); the database
    then admits it against the tenant's quota (429 when refused)."""
    # Neither rule is a schema keyword: each has its own code, so schema-valid data is never
    # answered VALIDATION_FAILED.
    if body.files is not None and (body.include is not None or body.exclude is not None):
        raise FILES_OR_PATTERNS.error()
    if body.files is not None and len({f.path for f in body.files}) < len(body.files):
        raise DUPLICATE_FILE_PATH.error()  # "unique by path"
    wanted = Wanted(
        body.repo_type,
        body.repo_id,
        body.revision,
        body.include,
        body.exclude,
        None if body.files is None else [f.model_dump() for f in body.files],
    )
    # Before the admission transaction, holding no connection or lock (bounded in time).
    manifest = await settle(request, principal, wanted)
    try:  # what the hub listed passes the same checks as a client's list
        checked = [FileSpec(**f).model_dump() for f in manifest.files]
    except ValidationError as exc:
        raise unavailable(None, f"the hub listed an unusable file: {exc.errors()[:1]}") from exc
    if sum(f["size"] for f in checked) > INT64_MAX:
        raise unavailable(None, "the hub's sizes add up to more than 2^63 - 1 bytes")
    files = json.dumps(checked)
    lock_timeout = request.app.state.settings.quota_lock_timeout_ms
    async with request_transaction(request, principal, "dlw.create_task") as conn:
        result = await conn.fetchrow(
            SQL["create_task"],
            body.project_id,
            str(body.storage_target),
            body.repo_id,
            body.revision,
            body.priority,
            files,
            idempotency_key,
            body.request_hash() if idempotency_key else None,
            lock_timeout,
            body.repo_type,
            manifest.commit,
        )
        existing = None
        if result is not None and result["outcome"] == "existing":  # a retry answers with the task as it is now
            existing = await conn.fetchrow(SQL["task_by_id"], result["task_id"])
    # Refusals are answered after the transaction committed: a quota refusal's audit row stays.
    if result is not None:
        count_admission(request, result["outcome"], result["metric"])  # /metrics: dlw_admissions_total
    outcome = answer_of("dlw.create_task", result)
    if outcome != "existing":  # committed: its files are claimable now (long-poll claims look)
        request.app.state.queue_wakeup.poke(request.app.state.pool, principal.tenant_id)
    if outcome == "existing":
        return JSONResponse(Task(**dict(found("task_by_id", existing))).model_dump(mode="json"), status_code=200)
    made = json.loads(result["detail"])
    task = Task(
        id=result["task_id"],
        project_id=made["project_id"],
        storage_target_id=made["storage_target_id"],
        repo_id=body.repo_id,
        repo_type=body.repo_type,
        revision=body.revision,
        commit=manifest.commit,
        status="pending",
        priority=body.priority,
        file_count=made["file_count"],
        total_bytes=made["total_bytes"],
        created_by=principal.user_id,
        error=None,
        created_at=made["created_at"],
        updated_at=made["created_at"],
        finished_at=None,
    )
    return JSONResponse(task.model_dump(mode="json"), status_code=201)


# One SQL text per filter shape (status filter?, cursor?), not `$n IS NULL OR ...`: each keeps a
# cheap generic plan. Parameters: limit, [status], [cursor at, id].
TASK_LIST_QUERIES = {
    (False, False): SQL["list_tasks"],
    (True, False): SQL["list_tasks_by_status"],
    (False, True): SQL["list_tasks_after"],
    (True, True): SQL["list_tasks_by_status_after"],
}


def task_list_query(*, status: bool, cursor: bool) -> str:
    """The list query for one filter shape."""
    return TASK_LIST_QUERIES[status, cursor]


@router.get("/tasks", response_model=TaskPage, responses=error_responses(INVALID_CURSOR))
async def list_tasks(
    request: Request,
    limit: Limit = 50,
    cursor: str | None = None,
    status: TaskStatus | None = None,
    principal: Principal = Depends(require_perm("/api/v1/tasks", "GET")),
) -> TaskPage:
    """The tenant's tasks, newest first (page with next_cursor)."""
    after = pagination.decode(cursor)
    args: list[Any] = [limit, *([status] if status else []), *(after or ())]
    rows = await fetch_rows(
        request, principal, task_list_query(status=status is not None, cursor=after is not None), *args
    )
    items = [Task(**dict(r)) for r in rows]
    return TaskPage(items=items, next_cursor=pagination.next_cursor(rows, limit, "created_at"))


@router.get("/tasks/{task_id}", response_model=Task, responses=error_responses("task_by_id"))
async def get_task(
    request: Request, task_id: uuid.UUID, principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}", "GET"))
) -> Task:
    """One task with its files; another tenant's id is 404."""
    async with request_transaction(request, principal) as conn:
        row = found("task_by_id", await conn.fetchrow(SQL["task_by_id"], task_id))
        files = await conn.fetch(SQL["task_files"], task_id)
        deletion = await conn.fetchrow(SQL["task_deletion"], task_id) if row["deletion"] else None
    return Task(
        **dict(row),
        files=[TaskFile(**dict(f)) for f in files],
        deletion_detail=Deletion(**dict(deletion)) if deletion else None,
    )


@router.delete("/tasks/{task_id}", status_code=202, response_model=Task, responses=error_responses("dlw.delete_task"))
async def delete_task(
    request: Request,
    task_id: uuid.UUID,
    principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}", "DELETE")),
) -> Task:
    """Remove a finished task's files from its storage target: an executor removes its snapshot
    and the blobs no other task of the tenant still holds, then its storage is released
    (docs/storage.md, "Deleting"). The task stays, showing `deletion`; asking again changes
    nothing. 409 TASK_LIVE for a pending or running task (cancel it first)."""
    async with request_transaction(request, principal, "dlw.delete_task") as conn:
        result = await conn.fetchrow(SQL["delete_task"], task_id)
        answer_of("dlw.delete_task", result)  # a refusal rolls back (it changed nothing anyway)
        row = found("task_by_id", await conn.fetchrow(SQL["task_by_id"], task_id))
    return Task(**dict(row))


@router.post(
    "/tasks/{task_id}/cancel", status_code=202, response_class=Response, responses=error_responses("dlw.cancel_task")
)
async def cancel_task(
    request: Request,
    task_id: uuid.UUID,
    principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}/cancel", "POST")),
) -> Response:
    """Cancel a pending or running task (its executors' leases are lost)."""
    await call_for_outcome(request, principal, "dlw.cancel_task", SQL["cancel_task"], task_id)
    return Response(status_code=202)


class Retried(BaseModel):
    files_requeued: int = Field(description="the failed and cancelled files queued again")
    bytes_requeued: int = Field(description="their declared bytes, admitted against the quota again")


@router.post(
    "/tasks/{task_id}/retry", status_code=202, response_model=Retried, responses=error_responses("dlw.retry_task")
)
async def retry_task(
    request: Request,
    task_id: uuid.UUID,
    principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}/retry", "POST")),
) -> Retried:
    """Queue a failed task's failed (and cancelled) files again, admitted against the quota like a
    new task; succeeded files stay done. 409 TASK_NOT_FAILED for any other task."""
    lock_timeout = request.app.state.settings.quota_lock_timeout_ms
    async with request_transaction(request, principal, "dlw.retry_task") as conn:
        result = await conn.fetchrow(SQL["retry_task"], task_id, lock_timeout)
    # Answered after the commit: a quota refusal's audit row stays.
    if result is not None and result["outcome"] in ("retried", "QUOTA_EXCEEDED"):
        count_admission(request, result["outcome"], result["metric"])  # /metrics: dlw_admissions_total
    answer_of("dlw.retry_task", result)
    request.app.state.queue_wakeup.poke(request.app.state.pool, principal.tenant_id)  # claimable again
    return Retried(**json.loads(result["detail"]))

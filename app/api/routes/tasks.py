"""Tasks, quota and storage targets: one tenant-scoped transaction per request, calling SQL."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api import pagination
from app.api.errors import ApiError, refuse
from app.authz.require import PermissionFirstRoute, acting, require_perm
from app.db import pool as db
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)

MAX_FILES = 10_000
TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
RepoId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")]
Revision = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
Limit = Annotated[int, Query(ge=1, le=pagination.MAX_LIMIT)]


class FileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0, le=1 << 53)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("path")
    @classmethod
    def relative_path(cls, value: str) -> str:
        if value.startswith("/") or "\\" in value or "\x00" in value:
            raise ValueError("must be a relative POSIX path")
        if any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("must not contain empty, '.' or '..' segments")
        return value

    @field_validator("sha256")
    @classmethod
    def lower_hex(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo_id: RepoId
    revision: Revision
    storage_target: str = Field("default", min_length=1, max_length=100, description="id or name")
    files: list[FileSpec] = Field(min_length=1, max_length=MAX_FILES)
    priority: int = Field(0, ge=-1000, le=1000)
    project_id: uuid.UUID | None = None

    @field_validator("revision")
    @classmethod
    def no_parent_segments(cls, value: str) -> str:
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' segments")
        return value

    @model_validator(mode="after")
    def unique_paths(self) -> TaskCreate:
        seen: set[str] = set()
        for index, spec in enumerate(self.files):
            if spec.path in seen:
                raise ValueError(f"files[{index}].path: duplicate path {spec.path!r}")
            seen.add(spec.path)
        return self

    def request_hash(self) -> bytes:
        return hashlib.sha256(self.model_dump_json().encode()).digest()


class TaskFile(BaseModel):
    id: uuid.UUID
    path: str
    size: int
    sha256: str | None
    status: str
    attempts: int
    bytes_done: int
    error: str | None
    finished_at: datetime | None


class Task(BaseModel):
    id: uuid.UUID
    project_id: uuid.UUID
    storage_target_id: uuid.UUID
    repo_id: str
    revision: str
    status: str
    priority: int
    file_count: int
    total_bytes: int
    created_by: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    files: list[TaskFile] | None = None


class TaskPage(BaseModel):
    items: list[Task]
    next_cursor: str | None


TASK_COLUMNS = (
    "id, project_id, storage_target_id, repo_id, revision, status, priority, file_count, total_bytes,"
    " created_by, error, created_at, updated_at, finished_at"
)
FILE_COLUMNS = "id, path, size, sha256, status, attempts, bytes_done, error, finished_at"
CREATE_REFUSALS = {
    "IDEMPOTENCY_CONFLICT": (409, "IDEMPOTENCY_CONFLICT"),
    "UNKNOWN_PROJECT": (422, "UNKNOWN_PROJECT"),
    "UNKNOWN_STORAGE_TARGET": (422, "UNKNOWN_STORAGE_TARGET"),
    "TENANT_INACTIVE": (403, "TENANT_INACTIVE"),
}
CANCEL_REFUSALS = {"NOT_FOUND": (404, "TASK_NOT_FOUND"), "TASK_TERMINAL": (409, "TASK_TERMINAL")}


@router.post(
    "/tasks",
    status_code=201,
    response_model=Task,
    responses={200: {"description": "An Idempotency-Key retry: the first task"}},
)
async def create_task(
    request: Request,
    body: TaskCreate,
    idempotency_key: str | None = Header(None, min_length=1, max_length=200),
    principal: Principal = Depends(require_perm("/api/v1/tasks", "POST")),
) -> JSONResponse:
    """Create a task; the database admits it against the tenant's quota (429 when refused)."""
    files = json.dumps([f.model_dump() for f in body.files])
    storage = str(body.storage_target)
    lock_timeout = request.app.state.settings.quota_lock_timeout_ms
    try:
        async with acting(request, principal) as conn:
            result = await conn.fetchrow(
                "SELECT * FROM dlw.create_task($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)",
                body.project_id,
                storage,
                body.repo_id,
                body.revision,
                body.priority,
                files,
                idempotency_key,
                body.request_hash() if idempotency_key else None,
                lock_timeout,
            )
            existing = None
            if result["outcome"] == "existing":  # a retry answers with the task as it is now
                existing = await conn.fetchrow(f"SELECT {TASK_COLUMNS} FROM dlw.tasks WHERE id = $1", result["task_id"])
    except asyncpg.LockNotAvailableError as exc:
        raise ApiError(503, "QUOTA_LOCK_TIMEOUT", headers={"Retry-After": "1"}) from exc
    # Refusals are answered after the transaction committed: a quota refusal's audit row stays.
    outcome = result["outcome"]
    if outcome == "QUOTA_EXCEEDED":
        raise ApiError(429, "QUOTA_EXCEEDED", metric=result["metric"])
    refuse(outcome, CREATE_REFUSALS)
    if existing is not None:
        return JSONResponse(Task(**dict(existing)).model_dump(mode="json"), status_code=200)
    assert outcome == "created", outcome
    made = json.loads(result["detail"])
    task = Task(
        id=result["task_id"],
        project_id=made["project_id"],
        storage_target_id=made["storage_target_id"],
        repo_id=body.repo_id,
        revision=body.revision,
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


def task_list_query(*, status: bool, cursor: bool) -> str:
    """The list query for one filter shape. One SQL text per shape (not `$n IS NULL OR ...`)
    keeps each a cheap generic plan; row-level security adds the tenant condition, which the
    index (tenant_id, created_at DESC, id DESC) serves. Parameters: limit, [status], [cursor]."""
    conditions = []
    if status:
        conditions.append("status = $2")
    if cursor:
        n = 3 if status else 2
        conditions.append(f"(created_at, id) < (${n}, ${n + 1})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"SELECT {TASK_COLUMNS} FROM dlw.tasks{where} ORDER BY created_at DESC, id DESC LIMIT $1"


@router.get("/tasks", response_model=TaskPage)
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
    async with acting(request, principal) as conn:
        rows = await conn.fetch(task_list_query(status=status is not None, cursor=after is not None), *args)
    items = [Task(**dict(r)) for r in rows]
    return TaskPage(items=items, next_cursor=pagination.next_cursor(rows, limit, "created_at"))


@router.get("/tasks/{task_id}", response_model=Task)
async def get_task(
    request: Request, task_id: uuid.UUID, principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}", "GET"))
) -> Task:
    """One task with its files; another tenant's id is 404."""
    async with acting(request, principal) as conn:
        row = await conn.fetchrow(f"SELECT {TASK_COLUMNS} FROM dlw.tasks WHERE id = $1", task_id)
        if row is None:
            raise ApiError(404, "TASK_NOT_FOUND")
        files = await conn.fetch(f"SELECT {FILE_COLUMNS} FROM dlw.task_files WHERE task_id = $1 ORDER BY path", task_id)
    return Task(**dict(row), files=[TaskFile(**dict(f)) for f in files])


@router.post("/tasks/{task_id}/cancel", status_code=202, response_class=Response)
async def cancel_task(
    request: Request,
    task_id: uuid.UUID,
    principal: Principal = Depends(require_perm("/api/v1/tasks/{task_id}/cancel", "POST")),
) -> Response:
    """Cancel a pending or running task (its executors' leases are lost)."""
    async with acting(request, principal) as conn:
        outcome = await conn.fetchval("SELECT dlw.cancel_task($1)", task_id)
    refuse(outcome, CANCEL_REFUSALS)
    return Response(status_code=202)


class Quota(BaseModel):
    tenant_id: int
    period: str
    bytes_used_month: int
    bytes_quota_month: int
    storage_gb_used: int
    storage_gb_quota: int
    concurrent_tasks: int
    concurrent_quota: int
    snapshot_refreshed_at: datetime | None
    snapshot_age_seconds: float | None


@router.get("/quota/current", response_model=Quota)
async def quota_current(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/quota/current", "GET"))
) -> Quota:
    """Limits (0 = unlimited) and exact usage now: this UTC month's bytes and live tasks."""
    async with acting(request, principal) as conn:
        row = await conn.fetchrow("SELECT * FROM dlw.quota_current()")
    if row is None:
        raise ApiError(404, "TENANT_NOT_FOUND")
    return Quota(**{**dict(row), "period": row["period"].isoformat()})


class StorageTargetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    kind: Literal["local"] = "local"
    config: dict[str, Any] = Field(default_factory=dict, description="never returned by the API")


class StorageTarget(BaseModel):
    id: uuid.UUID
    name: str
    kind: str
    created_at: datetime


@router.get("/storage-targets", response_model=list[StorageTarget])
async def list_storage_targets(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/storage-targets", "GET"))
) -> list[StorageTarget]:
    async with acting(request, principal) as conn:
        rows = await conn.fetch("SELECT id, name, kind, created_at FROM dlw.storage_targets ORDER BY name")
    return [StorageTarget(**dict(r)) for r in rows]


@router.post("/storage-targets", status_code=201, response_model=StorageTarget)
async def create_storage_target(
    request: Request,
    body: StorageTargetCreate,
    principal: Principal = Depends(require_perm("/api/v1/storage-targets", "POST")),
) -> StorageTarget:
    async with acting(request, principal) as conn:
        row = await db.insert_unique(
            conn,
            "STORAGE_TARGET_EXISTS",
            "INSERT INTO dlw.storage_targets (tenant_id, name, kind, config)"
            " VALUES (dlw.ctx_tenant_id(), $1, $2, $3::jsonb) RETURNING id, name, kind, created_at",
            body.name,
            body.kind,
            json.dumps(body.config),
        )
        await db.audit(conn, "storage_target.created", str(row["id"]), {"name": body.name, "kind": body.kind})
    return StorageTarget(**dict(row))

"""The tenant's storage targets: where executors put downloaded files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.openapi_errors import error_responses
from app.api.refusals import found
from app.api.transaction import request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.pool import audit
from app.db.queries import SQL
from app.domain import STORAGE_TARGET_NAME_PATTERN
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)


class StorageTargetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=STORAGE_TARGET_NAME_PATTERN)
    kind: Literal["local"] = "local"
    config: dict[str, Any] = Field(default_factory=dict, description="never returned by the API")


class StorageTarget(BaseModel):
    id: uuid.UUID
    name: str
    kind: str
    created_at: datetime


@router.get("/storage-targets", response_model=list[StorageTarget], responses=error_responses())
async def list_storage_targets(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/storage-targets", "GET"))
) -> list[StorageTarget]:
    async with request_transaction(request, principal) as conn:
        rows = await conn.fetch(SQL["list_storage_targets"])
    return [StorageTarget(**dict(r)) for r in rows]


@router.post(
    "/storage-targets",
    status_code=201,
    response_model=StorageTarget,
    responses=error_responses("insert_storage_target"),
)
async def create_storage_target(
    request: Request,
    body: StorageTargetCreate,
    principal: Principal = Depends(require_perm("/api/v1/storage-targets", "POST")),
) -> StorageTarget:
    # A duplicate name (within the tenant's own key space) is 409 STORAGE_TARGET_EXISTS.
    async with request_transaction(request, principal, "insert_storage_target") as conn:
        row = await conn.fetchrow(SQL["insert_storage_target"], body.name, body.kind, json.dumps(body.config))
        row = found("insert_storage_target", row)
        await audit(conn, "storage_target.created", str(row["id"]), {"name": body.name, "kind": body.kind})
    return StorageTarget(**dict(row))

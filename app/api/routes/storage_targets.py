"""The tenant's storage targets: where executors put downloaded files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.openapi_errors import error_responses
from app.api.transaction import fetch_rows, insert_audited
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.queries import SQL
from app.domain import STORAGE_TARGET_NAME_PATTERN
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["tasks"], route_class=PermissionFirstRoute)


class StorageTargetCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"name": "scratch", "kind": "local", "config": {"root": "/srv/models"}}]},
    )
    name: str = Field(pattern=STORAGE_TARGET_NAME_PATTERN)
    kind: Literal["local"] = "local"
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="root (an absolute directory; none: the executor's default storage) and layout"
        " (tree or hf-cache); no other key, no credentials (docs/storage.md). Never returned by the API",
    )


class StorageTarget(BaseModel):
    id: uuid.UUID
    name: str
    kind: str
    created_at: datetime


@router.get("/storage-targets", response_model=list[StorageTarget], responses=error_responses())
async def list_storage_targets(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/storage-targets", "GET"))
) -> list[StorageTarget]:
    """The tenant's storage targets (their config is never returned)."""
    return [StorageTarget(**dict(r)) for r in await fetch_rows(request, principal, SQL["list_storage_targets"])]


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
    """Add a storage target to the tenant (up to its storage-target quota)."""
    # A duplicate name (within the tenant's own key space) is 409 STORAGE_TARGET_EXISTS.
    row = await insert_audited(
        request,
        principal,
        "insert_storage_target",
        SQL["insert_storage_target"],
        (body.name, body.kind, json.dumps(body.config)),
        action="storage_target.created",
        detail={"name": body.name, "kind": body.kind},
    )
    return StorageTarget(**dict(row))

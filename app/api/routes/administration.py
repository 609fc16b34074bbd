"""Administration: tenants (system_admin), users, service accounts and the audit trail
(tenant_admin, within their tenant; row-level security keeps every query in it)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api import pagination
from app.api.openapi_document import enum_field
from app.api.openapi_errors import error_responses
from app.api.refusals import INVALID_CURSOR, OIDC_NOT_CONFIGURED_422, answer_of, found
from app.api.transaction import fetch_rows, insert_audited, request_transaction
from app.authz.require import PermissionFirstRoute, require_perm
from app.db.pool import audit
from app.db.queries import SQL
from app.domain import (
    DEFAULT_QUOTA_BYTES_MONTH,
    DEFAULT_QUOTA_CONCURRENT,
    DEFAULT_QUOTA_STORAGE_GB,
    DISPLAY_NAME_MAX_LENGTH,
    SERVICE_ACCOUNT_ROLES,
    TENANT_ROLES,
    TENANT_SLUG_PATTERN,
)
from app.identity.principal import Principal

router = APIRouter(prefix="/api/v1", tags=["administration"], route_class=PermissionFirstRoute)

Slug = Annotated[str, Field(pattern=TENANT_SLUG_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=pagination.MAX_LIMIT)]
INT64_MAX = (1 << 63) - 1
TenantId = Annotated[int, Path(ge=-INT64_MAX - 1, le=INT64_MAX)]  # a bigint, else 422
TenantRole = Literal["tenant_admin", "tenant_operator", "tenant_viewer"]  # = app.domain.TENANT_ROLES (tested)
ServiceAccountRole = Literal["tenant_admin", "tenant_operator", "tenant_viewer", "executor"]  # = SERVICE_ACCOUNT_ROLES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- tenants (system_admin) ----------------------------------------------------------------
class TenantCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"slug": "acme", "display_name": "Acme Corp", "quota_concurrent": 10}]}
    )
    slug: Slug
    display_name: str = Field(min_length=1, max_length=DISPLAY_NAME_MAX_LENGTH)
    quota_concurrent: int = Field(DEFAULT_QUOTA_CONCURRENT, ge=0, le=1_000_000)
    quota_bytes_month: int = Field(DEFAULT_QUOTA_BYTES_MONTH, ge=0, le=1 << 62)
    quota_storage_gb: int = Field(DEFAULT_QUOTA_STORAGE_GB, ge=0, le=1 << 30)


class TenantPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"quota_concurrent": 20}, {"active": False}]})
    display_name: str | None = Field(None, min_length=1, max_length=DISPLAY_NAME_MAX_LENGTH)
    quota_concurrent: int | None = Field(None, ge=0, le=1_000_000)
    quota_bytes_month: int | None = Field(None, ge=0, le=1 << 62)
    quota_storage_gb: int | None = Field(None, ge=0, le=1 << 30)
    active: bool | None = None


class Tenant(BaseModel):
    tenant_id: int
    slug: str
    display_name: str
    active: bool
    quota_concurrent: int
    quota_bytes_month: int
    quota_storage_gb: int
    created_at: datetime
    updated_at: datetime


async def _tenant(conn: asyncpg.Connection, tenant_id: int) -> Tenant:
    return Tenant(**dict(found("tenant_by_id", await conn.fetchrow(SQL["tenant_by_id"], tenant_id))))


@router.post(
    "/tenants", status_code=201, response_model=Tenant, responses=error_responses("dlw.platform_create_tenant")
)
async def create_tenant(
    request: Request, body: TenantCreate, principal: Principal = Depends(require_perm("/api/v1/tenants", "POST"))
) -> Tenant:
    """Create a tenant with its default project and `default` storage target."""
    async with request_transaction(request, principal) as conn:
        row = await conn.fetchrow(
            SQL["platform_create_tenant"],
            body.slug,
            body.display_name,
            body.quota_concurrent,
            body.quota_bytes_month,
            body.quota_storage_gb,
        )
        answer_of("dlw.platform_create_tenant", row)
        return await _tenant(conn, row["tenant_id"])


@router.get("/tenants", response_model=list[Tenant], responses=error_responses())
async def list_tenants(
    request: Request,
    after_id: int = Query(0, ge=0, le=INT64_MAX),
    limit: Limit = 100,
    principal: Principal = Depends(require_perm("/api/v1/tenants", "GET")),
) -> list[Tenant]:
    """Every tenant, by id (page with after_id)."""
    return [Tenant(**dict(r)) for r in await fetch_rows(request, principal, SQL["list_tenants"], after_id, limit)]


@router.get("/tenants/{tenant_id}", response_model=Tenant, responses=error_responses("tenant_by_id"))
async def get_tenant(
    request: Request,
    tenant_id: TenantId,
    principal: Principal = Depends(require_perm("/api/v1/tenants/{tenant_id}", "GET", tenant_path_param="tenant_id")),
) -> Tenant:
    """One tenant with its limits."""
    async with request_transaction(request, principal) as conn:
        return await _tenant(conn, tenant_id)


@router.patch(
    "/tenants/{tenant_id}",
    response_model=Tenant,
    responses=error_responses("dlw.platform_update_tenant", "tenant_by_id"),
)
async def update_tenant(
    request: Request,
    tenant_id: TenantId,
    body: TenantPatch,
    principal: Principal = Depends(require_perm("/api/v1/tenants/{tenant_id}", "PATCH", tenant_path_param="tenant_id")),
) -> Tenant:
    """Change limits (0 = unlimited), the active flag or the display name."""
    async with request_transaction(request, principal) as conn:
        outcome = await conn.fetchval(
            SQL["platform_update_tenant"],
            tenant_id,
            body.quota_concurrent,
            body.quota_bytes_month,
            body.quota_storage_gb,
            body.active,
            body.display_name,
        )
        answer_of("dlw.platform_update_tenant", outcome)
        return await _tenant(conn, tenant_id)


# -- users (tenant_admin) ------------------------------------------------------------------
class User(BaseModel):
    id: uuid.UUID
    email: str | None
    role: str = enum_field(TENANT_ROLES)
    issuer: str
    subject: str
    created_at: datetime
    last_login_at: datetime | None


class UserPage(BaseModel):
    items: list[User]
    next_cursor: str | None


class UserPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"role": "tenant_operator"}]})
    role: TenantRole


@router.get("/users", response_model=UserPage, responses=error_responses(INVALID_CURSOR))
async def list_users(
    request: Request,
    limit: Limit = 100,
    cursor: str | None = None,
    principal: Principal = Depends(require_perm("/api/v1/users", "GET")),
) -> UserPage:
    """The tenant's users, newest first."""
    rows, next_cursor = await pagination.keyset_page(
        request, principal, SQL["list_users"], cursor=cursor, limit=limit, time_column="created_at"
    )
    return UserPage(items=[User(**dict(r)) for r in rows], next_cursor=next_cursor)


@router.patch("/users/{user_id}", response_model=User, responses=error_responses("dlw.set_user_role"))
async def update_user(
    request: Request,
    user_id: uuid.UUID,
    body: UserPatch,
    principal: Principal = Depends(require_perm("/api/v1/users/{user_id}", "PATCH")),
) -> User:
    """Change a user's role within the tenant (never above tenant_admin)."""
    async with request_transaction(request, principal) as conn:
        answer_of("dlw.set_user_role", await conn.fetchval(SQL["set_user_role"], user_id, body.role))
        row = await conn.fetchrow(SQL["user_by_id"], user_id)
    return User(**dict(row))


# -- service accounts (tenant_admin) -------------------------------------------------------
class ServiceAccountCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"client_id": "ci-pipeline", "role": "tenant_operator", "description": "nightly model sync"}]
        }
    )
    client_id: str = Field(min_length=1, max_length=255)
    role: ServiceAccountRole
    description: str = Field("", max_length=500)
    issuer: str | None = Field(None, min_length=1, max_length=500, description="default: DLW_OIDC_ISSUER")


class ServiceAccount(BaseModel):
    id: uuid.UUID
    issuer: str
    client_id: str
    role: str = enum_field(SERVICE_ACCOUNT_ROLES)
    description: str
    created_at: datetime


@router.post(
    "/service-accounts",
    status_code=201,
    response_model=ServiceAccount,
    responses=error_responses("insert_service_account", OIDC_NOT_CONFIGURED_422),
)
async def create_service_account(
    request: Request,
    body: ServiceAccountCreate,
    principal: Principal = Depends(require_perm("/api/v1/service-accounts", "POST")),
) -> ServiceAccount:
    """Let an identity-provider client (client-credentials tokens) act in this tenant."""
    issuer = body.issuer or request.app.state.settings.oidc_issuer
    if not issuer:
        raise OIDC_NOT_CONFIGURED_422.error()
    # A client registered twice (within the tenant's own key space) is 409 SERVICE_ACCOUNT_EXISTS.
    row = await insert_audited(
        request,
        principal,
        "insert_service_account",
        SQL["insert_service_account"],
        (issuer, body.client_id, body.role, body.description),
        action="service_account.created",
        detail={"client_id": body.client_id, "role": body.role, "issuer": issuer},
    )
    return ServiceAccount(**dict(row))


@router.get("/service-accounts", response_model=list[ServiceAccount], responses=error_responses())
async def list_service_accounts(
    request: Request, principal: Principal = Depends(require_perm("/api/v1/service-accounts", "GET"))
) -> list[ServiceAccount]:
    """The tenant's service accounts."""
    return [ServiceAccount(**dict(r)) for r in await fetch_rows(request, principal, SQL["list_service_accounts"])]


@router.delete(
    "/service-accounts/{account_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses("delete_service_account"),
)
async def delete_service_account(
    request: Request,
    account_id: uuid.UUID,
    principal: Principal = Depends(require_perm("/api/v1/service-accounts/{account_id}", "DELETE")),
) -> Response:
    """Unregister a service account: its client's tokens are refused from now on."""
    async with request_transaction(request, principal) as conn:
        row = found("delete_service_account", await conn.fetchrow(SQL["delete_service_account"], account_id))
        await audit(conn, "service_account.deleted", str(account_id), {"client_id": row["client_id"]})
    return Response(status_code=204)


# -- audit trail (tenant_admin) ------------------------------------------------------------
class AuditEntry(BaseModel):
    id: uuid.UUID
    at: datetime
    actor: str | None
    action: str
    target: str | None
    detail: dict[str, Any]
    count: int = Field(description="occurrences: 1, or those of a repeated denial or refusal in the minute of `at`")
    last_at: datetime | None = Field(description="a repeat row's latest occurrence; null for a single event")


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None


@router.get(
    "/audit", response_model=AuditPage, operation_id="listAuditEntries", responses=error_responses(INVALID_CURSOR)
)
async def audit_trail(
    request: Request,
    limit: Limit = 50,
    cursor: str | None = None,
    action: str | None = Query(None, max_length=100),
    principal: Principal = Depends(require_perm("/api/v1/audit", "GET")),
) -> AuditPage:
    """The tenant's audit rows, newest first."""
    # One SQL text per filter shape, so the filtered one keeps its index (audit_log_tenant_action_at).
    query, filters = (SQL["audit_trail"], ()) if action is None else (SQL["audit_trail_by_action"], (action,))
    rows, next_cursor = await pagination.keyset_page(
        request, principal, query, *filters, cursor=cursor, limit=limit, time_column="at"
    )
    items = [AuditEntry(**{**dict(r), "detail": json.loads(r["detail"])}) for r in rows]
    return AuditPage(items=items, next_cursor=next_cursor)

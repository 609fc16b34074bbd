"""The request's tenant transaction: every tenant route runs its SQL inside exactly one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import Request

from app.api.refusals import answer_of, found, specific_sqlstates
from app.db.pool import audit, tenant_transaction
from app.identity.principal import Principal


@asynccontextmanager
async def request_transaction(request: Request, principal: Principal, *calls: str) -> AsyncIterator[asyncpg.Connection]:
    """One transaction in the principal's tenant and (acting) role.

    calls name the registry entries (app/api/refusals.py) whose specific SQLSTATE answers apply
    to the whole block, commit included; other database errors reach the general table."""
    with specific_sqlstates(*calls):
        async with tenant_transaction(
            request.app.state.pool,
            principal.tenant_id,
            principal.user_id,
            principal.role,
            acquire_timeout=request.app.state.settings.db_acquire_timeout_seconds,
        ) as conn:
            yield conn


async def call_for_outcome(
    request: Request, principal: Principal, call: str, query: str, *args: Any
) -> tuple[str, asyncpg.Record]:
    """Run one SQL function (registry key call, its named query, a row with an `outcome` column)
    in a transaction of its own; its listed success outcome and the row.

    The outcome is answered after the commit: what a refusal did (a file failed on a sha256
    mismatch) stays, and an unlisted outcome still fails closed."""
    async with request_transaction(request, principal, call) as conn:
        row = await conn.fetchrow(query, *args)
    return answer_of(call, row), row


async def insert_audited(
    request: Request,
    principal: Principal,
    insert: str,
    query: str,
    args: Sequence[Any],
    *,
    action: str,
    detail: dict[str, Any],
) -> asyncpg.Record:
    """The row a named query inserts (registry key insert; RETURNING the row with its id), with
    `action` on it audited in the same transaction.

    The insert's specific SQLSTATE answers (a unique violation's 409) apply to the commit too."""
    async with request_transaction(request, principal, insert) as conn:
        row = found(insert, await conn.fetchrow(query, *args))
        await audit(conn, action, str(row["id"]), detail)
    return row


async def fetch_rows(request: Request, principal: Principal, query: str, *args: Any) -> list[asyncpg.Record]:
    """The rows of one read, in a transaction of its own (row-level security scopes them)."""
    async with request_transaction(request, principal) as conn:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
    return rows

"""The request's tenant transaction: every tenant route runs its SQL inside exactly one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import Request

from app.api.refusals import specific_sqlstates
from app.db.pool import tenant_transaction
from app.identity.principal import Principal


@asynccontextmanager
async def request_transaction(request: Request, principal: Principal, *calls: str) -> AsyncIterator[asyncpg.Connection]:
    """One transaction in the principal's tenant and (acting) role.

    calls name the registry entries (app/api/refusals.py) whose specific SQLSTATE answers apply
    to the whole block, commit included; other database errors reach the general table."""
    with specific_sqlstates(*calls):
        async with tenant_transaction(
            request.app.state.pool, principal.tenant_id, principal.user_id, principal.role
        ) as conn:
            yield conn

"""asyncpg access for the API: the pool, and the tenant-scoped transaction every request uses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from app.db.queries import SQL


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 20, **options: Any) -> asyncpg.Pool:
    """The request pool; `options` are Endpoints.pool_options() (no statement cache behind a
    transaction pooler, app/db/connect.py)."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        # Nothing request-scoped may survive on a pooled connection: settings are set with
        # set_config(..., true) inside the request transaction, and reset anyway on release.
        # Only startup parameters PgBouncer tracks itself (it refuses any other).
        server_settings={"application_name": "dlw-api", "timezone": "UTC"},
        **options,
    )
    assert pool is not None
    return pool


async def role_safety_problem(conn: asyncpg.Connection) -> str | None:
    """Why this connection's role would defeat row-level security, or None when it is safe."""
    row = await conn.fetchrow(SQL["role_safety"])
    assert row is not None
    if row["rolsuper"]:
        return f"database role {row['name']} is a superuser (row-level security would not apply)"
    if row["rolbypassrls"]:
        return f"database role {row['name']} has BYPASSRLS (row-level security would not apply)"
    return None


@asynccontextmanager
async def tenant_transaction(
    pool: asyncpg.Pool, tenant_id: int, user_id: str, role: str
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction acting for one tenant: the context is set first, in one statement,
    transaction-locally, so it cannot leak to the next user of the pooled connection."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL["set_context"], tenant_id, user_id, role)
        yield conn


async def audit(conn: asyncpg.Connection, action: str, target: str, detail: dict[str, Any]) -> None:
    """Append a row to the current tenant's audit trail, in the caller's transaction."""
    await conn.execute(SQL["audit"], action, target, json.dumps(detail))


async def audit_repeat(conn: asyncpg.Connection, action: str, target: str, detail: dict[str, Any]) -> None:
    """Count one occurrence of a repeatable event (a denial) on the current tenant's audit trail:
    one row per actor, action, target and UTC minute, whose count grows (dlw.audit_repeat)."""
    await conn.execute(SQL["audit_repeat"], action, target, json.dumps(detail))

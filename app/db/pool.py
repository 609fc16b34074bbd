"""asyncpg access for the API: the pool, and the tenant-scoped transaction every request uses."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from app.api.sqlstates import CommitUncertain, is_connection_fault
from app.db.queries import SQL

log = logging.getLogger("dlw.db")


class OneLineFaults(logging.Filter):
    """asyncpg's pool logs each failed reconnect (restoring min_size) with a traceback: during an
    outage, one traceback per retry. A connection fault there is one line, exception included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_connection_fault(record.exc_info[1]):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("asyncpg.pool").addFilter(OneLineFaults())


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
    pool: asyncpg.Pool, tenant_id: int, user_id: str, role: str, *, acquire_timeout: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction acting for one tenant: the context is set first, in one statement,
    transaction-locally, so it cannot leak to the next user of the pooled connection.

    The three phases fail differently. Before COMMIT is sent, a failure is the block's error
    (a connection fault is answered 503). A connection fault while COMMIT is on its way raises
    CommitUncertain (the change may be made: 503 COMMIT_UNCERTAIN, retry with the same key).
    After COMMIT succeeded nothing changes the answer: a failure to reset the connection on its
    way back to the pool (a terminated backend: "cannot switch to state 15") is logged, and the
    pool replaces the connection."""
    conn = await pool.acquire(timeout=acquire_timeout)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(SQL["set_context"], tenant_id, user_id, role)
            yield conn
        except BaseException as exc:
            if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                # The server stopped taking writes under the pool (pg_auto_failover fences a node
                # with default_transaction_read_only while it promotes or demotes): replace every
                # pooled connection, so the next ones are chosen again by target_session_attrs.
                await pool.expire_connections()
            await _rollback(transaction)
            raise
        await _commit(conn, transaction)
    finally:
        await _release(pool, conn)


async def _rollback(transaction: asyncpg.transaction.Transaction) -> None:
    # The block's own error is the answer; a rollback on a dead connection adds nothing to it
    # (the server rolls back a transaction whose session ended).
    try:
        await transaction.rollback()
    except Exception as exc:
        if not is_connection_fault(exc):
            raise
        log.warning("rollback failed on a broken connection: %r", exc)


async def _commit(conn: asyncpg.Connection, transaction: asyncpg.transaction.Transaction) -> None:
    if conn.is_closed():  # COMMIT was never sent: the change is certainly not made
        raise asyncpg.ConnectionDoesNotExistError("connection closed before COMMIT")
    try:
        await transaction.commit()
    except Exception as exc:
        if is_connection_fault(exc):
            raise CommitUncertain(repr(exc)) from exc
        raise


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    try:
        await pool.release(conn)
    except Exception as exc:
        if not is_connection_fault(exc):
            raise
        # asyncpg has terminated the connection already; the answer stands.
        log.warning("connection reset after the transaction failed (the pool replaces it): %r", exc)


async def audit(conn: asyncpg.Connection, action: str, target: str, detail: dict[str, Any]) -> None:
    """Append a row to the current tenant's audit trail, in the caller's transaction."""
    await conn.execute(SQL["audit"], action, target, json.dumps(detail))


async def audit_repeat(conn: asyncpg.Connection, action: str, target: str, detail: dict[str, Any]) -> None:
    """Count one occurrence of a repeatable event (a denial) on the current tenant's audit trail:
    one row per actor, action, target and UTC minute, whose count grows (dlw.audit_repeat)."""
    await conn.execute(SQL["audit_repeat"], action, target, json.dumps(detail))

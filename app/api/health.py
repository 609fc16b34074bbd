"""/healthz (the process is up) and /readyz (the database carries the schema this code expects)."""

from __future__ import annotations

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.errors import DB_UNAVAILABLE, Refusal
from app.api.openapi_errors import error_responses
from app.api.sqlstates import UNAVAILABLE_ERRORS
from app.db.queries import SQL
from app.ops.migrate import migration_ids, program_files, program_sha256

router = APIRouter(tags=["health"])


def expected_schema() -> tuple[str, frozenset[str]]:
    """(sql/ program hash, migration ids) of this code; create_app keeps it in app.state."""
    return program_sha256(program_files()), frozenset(migration_ids())


@router.get("/healthz", operation_id="getHealth", responses=error_responses(database=False))
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


UNAVAILABLE = DB_UNAVAILABLE.description
NOT_MIGRATED_REFUSAL = Refusal(
    503, "NOT_MIGRATED", "the database does not carry the schema this code expects: run dlw migrate"
)
NOT_MIGRATED = NOT_MIGRATED_REFUSAL.description


@router.get(
    "/readyz",
    response_model=None,
    operation_id="getReadiness",
    responses={
        200: {
            "description": "Ready",
            "content": {
                "application/json": {"schema": {"type": "object", "properties": {"status": {"const": "ready"}}}}
            },
        },
        # readyz answers these itself, without Retry-After: a probe polls anyway
        **error_responses(Refusal(503, DB_UNAVAILABLE.code, UNAVAILABLE), NOT_MIGRATED_REFUSAL, database=False),
    },
)
async def readyz(request: Request) -> dict[str, str] | JSONResponse:
    """The database answers and carries the schema this code expects."""
    expected_program, expected_migrations = request.app.state.expected_schema
    try:
        async with request.app.state.pool.acquire(timeout=5) as conn:
            row = await conn.fetchrow(SQL["schema_program"])
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
        return JSONResponse(status_code=503, content={"detail": {"code": "DB_UNAVAILABLE", "message": UNAVAILABLE}})
    if row is None or row["program_sha256"] != expected_program:
        return JSONResponse(status_code=503, content={"detail": {"code": "NOT_MIGRATED", "message": NOT_MIGRATED}})
    if not expected_migrations <= set(row["migrations"]):
        return JSONResponse(status_code=503, content={"detail": {"code": "NOT_MIGRATED", "message": NOT_MIGRATED}})
    return {"status": "ready"}

"""The baseline of the create-task benchmark: a bare FastAPI + asyncpg endpoint running the same
admission SQL as POST /api/v1/tasks (dlw.set_context, then dlw.create_task, in one transaction),
with no authentication, no RBAC, no request model and no audit of its own.

Run like the real server: `python -m bench.bare_app --port N` (uvicorn, one worker, log level
info), connecting as dlw_app through the same pool code (app.db.pool.create_pool) and pool sizes.
Environment: BENCH_DATABASE_URL (dlw_app), BENCH_POOL_MIN_SIZE, BENCH_POOL_MAX_SIZE.
The tenant comes from the X-Tenant-Id header (trusted: this endpoint exists only to be measured).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.db.pool import create_pool, tenant_transaction

CREATE_SQL = "SELECT * FROM dlw.create_task($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)"
LOCK_TIMEOUT_MS = 2000  # the API's default DLW_QUOTA_LOCK_TIMEOUT_MS


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await create_pool(
            os.environ["BENCH_DATABASE_URL"],
            min_size=int(os.environ.get("BENCH_POOL_MIN_SIZE", "2")),
            max_size=int(os.environ.get("BENCH_POOL_MAX_SIZE", "20")),
        )
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/tasks")
    async def create_task(request: Request) -> JSONResponse:
        tenant = int(request.headers["x-tenant-id"])
        body = await request.json()
        async with tenant_transaction(request.app.state.pool, tenant, "bench", "tenant_operator") as conn:
            row = await conn.fetchrow(
                CREATE_SQL,
                None,
                body.get("storage_target", "default"),
                body["repo_id"],
                body["revision"],
                body.get("priority", 0),
                json.dumps(body["files"]),
                None,
                None,
                LOCK_TIMEOUT_MS,
            )
        status = 201 if row["outcome"] == "created" else 409
        return JSONResponse({"outcome": row["outcome"], "task_id": str(row["task_id"])}, status_code=status)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Exactly as `dlw serve` runs the real API (app/cli.py): one process, log level info.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()

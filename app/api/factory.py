"""The FastAPI application: thin routes over SQL, one tenant-scoped transaction per request."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.api.body_limit import BodySizeLimit
from app.api.routes import administration, executor, tasks
from app.api.routes import auth as auth_routes
from app.api.snapshot_leader import SnapshotRunner
from app.api.startup_guard import configuration_problems
from app.authz.authorizer import Authorizer
from app.config import DEFAULT_JWT_SECRET, Settings, get_settings
from app.db import pool as db
from app.identity.oidc import OidcClient
from app.identity.tenant_rules import parse_rules
from app.ops.migrate import migration_ids, program_files, program_sha256

log = logging.getLogger("dlw")


# Errors that mean "the database cannot serve right now", answered 503 rather than 500.
DB_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
)


class StartupRefused(RuntimeError):
    """The configuration is unsafe; the message names the setting to fix."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    problems = configuration_problems(settings)
    if problems:
        raise StartupRefused("; ".join(problems))
    if settings.auth_dev_mode and settings.system_jwt_secret == DEFAULT_JWT_SECRET:
        # Never sign with a publicly known secret, even in dev mode: use one for this process.
        log.warning("dev mode: DLW_SYSTEM_JWT_SECRET unset; tokens are signed with a random per-process secret")
        settings = settings.model_copy(update={"system_jwt_secret": secrets.token_urlsafe(48)})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.database_url:
            raise StartupRefused("DLW_DATABASE_URL is not set (the API connects as dlw_app)")
        pool = await db.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
        )
        try:
            async with pool.acquire() as conn:
                problem = await db.role_safety_problem(conn)
            if problem and not settings.auth_dev_mode:
                raise StartupRefused(f"DLW_DATABASE_URL: {problem}")
            if problem:
                log.warning("dev mode: %s", problem)
            app.state.pool = pool
            app.state.authz = Authorizer(pool)
            await app.state.authz.start(settings.database_url)
            # Usage snapshots: nothing to run under pg_cron, else compete for leadership.
            app.state.snapshot_runner = SnapshotRunner(
                settings.database_url,
                interval=settings.snapshot_interval_seconds,
                retry=settings.snapshot_leader_retry_seconds,
            )
            try:
                await app.state.snapshot_runner.start(pool)
                yield
            finally:
                await app.state.snapshot_runner.stop()
                await app.state.authz.stop()
        finally:
            await pool.close()

    app = FastAPI(title="DLW", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.tenant_rules = parse_rules(settings.auth_tenant_rules_json)
    app.state.oidc = (
        OidcClient(
            issuer=settings.oidc_issuer,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret,
            redirect_url=settings.oidc_redirect_url,
            audience=settings.oidc_audience,
        )
        if settings.oidc_issuer
        else None
    )
    app.include_router(tasks.router)  # the busiest routes first: FastAPI matches in order
    app.include_router(auth_routes.router)
    app.include_router(administration.router)
    app.include_router(executor.router)
    app.add_middleware(BodySizeLimit)
    expected_program = program_sha256(program_files())
    expected_migrations = set(migration_ids())

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Never a stack trace or a library message to the client; the log keeps the details.
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            # Row-level security refused what the route allowed: defense in depth at work.
            log.warning("database refused %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse(status_code=403, content={"detail": {"code": "DB_FORBIDDEN"}})
        if isinstance(exc, DB_UNAVAILABLE):
            log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
            return JSONResponse(
                status_code=503, content={"detail": {"code": "DB_UNAVAILABLE"}}, headers={"Retry-After": "2"}
            )
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": {"code": "INTERNAL_ERROR"}})

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=None)
    async def readyz(request: Request) -> dict[str, str] | JSONResponse:
        """The database answers and carries the schema this code expects."""
        try:
            async with request.app.state.pool.acquire(timeout=5) as conn:
                row = await conn.fetchrow("SELECT program_sha256, migrations FROM dlw.schema_program")
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return JSONResponse(status_code=503, content={"detail": {"code": "DB_UNAVAILABLE"}})
        if row is None or row["program_sha256"] != expected_program:
            return JSONResponse(status_code=503, content={"detail": {"code": "NOT_MIGRATED"}})
        if not expected_migrations <= set(row["migrations"]):
            return JSONResponse(status_code=503, content={"detail": {"code": "NOT_MIGRATED"}})
        return {"status": "ready"}

    return app

"""`dlw serve`: refuse an unsafe configuration, else run the API under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from app.config import Settings, get_settings


async def _role_problem(settings: Settings) -> tuple[str | None, str | None]:
    """(role problem, pooler problem) of DLW_DATABASE_URL."""
    from app.db.connect import PoolerMisconfigured, connect_once, resolve_endpoints
    from app.db.pool import role_safety_problem

    assert settings.database_url
    conn = await connect_once(settings.database_url)
    try:
        role_problem = await role_safety_problem(conn)
    finally:
        await conn.close()
    try:
        await resolve_endpoints(settings)
    except PoolerMisconfigured as exc:
        return role_problem, str(exc)
    return role_problem, None


def refusals(settings: Settings) -> list[str]:
    """Everything that makes this configuration unsafe to serve, one line each."""
    from app.api.startup_guard import configuration_problems

    problems = configuration_problems(settings)
    if not settings.database_url:
        return [*problems, "DLW_DATABASE_URL is not set (the API connects as dlw_app)"]
    try:
        role_problem, pooler_problem = asyncio.run(_role_problem(settings))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return [*problems, f"DLW_DATABASE_URL: cannot connect ({exc.__class__.__name__}: {exc})"]
    if role_problem and not settings.auth_dev_mode:
        problems.append(f"DLW_DATABASE_URL: {role_problem}")
    if pooler_problem:  # in dev mode too: grants and snapshots would silently stop
        problems.append(pooler_problem)
    return problems


def serve(settings: Settings, host: str, port: int) -> int:
    """Exit code 2 after printing the refusals; else serve until stopped."""
    import uvicorn

    from app.api.factory import create_app

    problems = refusals(settings)
    if problems:
        for line in problems:
            print(f"dlw: refusing to start: {line}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(get_settings(), args.host, args.port)

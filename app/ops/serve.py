"""`dlw serve`: refuse an unsafe configuration, else run the API under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from app.config import Settings, get_settings


async def _role_problem(url: str) -> str | None:
    from app.db.pool import role_safety_problem

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await role_safety_problem(conn)
    finally:
        await conn.close()


def refusals(settings: Settings) -> list[str]:
    """Everything that makes this configuration unsafe to serve, one line each."""
    from app.api.startup_guard import configuration_problems

    problems = configuration_problems(settings)
    if not settings.database_url:
        return [*problems, "DLW_DATABASE_URL is not set (the API connects as dlw_app)"]
    try:
        role_problem = asyncio.run(_role_problem(settings.database_url))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return [*problems, f"DLW_DATABASE_URL: cannot connect ({exc.__class__.__name__}: {exc})"]
    if role_problem and not settings.auth_dev_mode:
        problems.append(f"DLW_DATABASE_URL: {role_problem}")
    return problems


def serve(settings: Settings, host: str, port: int) -> int:
    """Exit code 2 after printing the refusals; else serve until stopped."""
    import uvicorn

    from app.api.factory import create_app
    from app.api.http_limits import uvicorn_options

    problems = refusals(settings)
    if problems:
        for line in problems:
            print(f"dlw: refusing to start: {line}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", **uvicorn_options(settings))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(get_settings(), args.host, args.port)

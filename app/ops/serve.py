"""`dlw serve`: refuse an unsafe configuration, else run the API under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from app.config import Settings, get_settings


async def _database_problems(settings: Settings) -> list[str]:
    """The refusals about the database URLs: a role that defeats RLS, a pooler without a
    session URL (in dev mode too: grants and snapshots would silently stop)."""
    from app.db.connect import Endpoints, PoolerMisconfigured, resolve_endpoints, role_problems

    assert settings.database_url
    try:
        endpoints = await resolve_endpoints(settings)
    except PoolerMisconfigured as exc:
        url = settings.database_url
        roles = await role_problems(Endpoints(url=url, direct_url=url, pooled=True))
        return [*([] if settings.auth_dev_mode else roles), str(exc)]
    roles = await role_problems(endpoints)
    return [] if settings.auth_dev_mode else roles


def refusals(settings: Settings) -> list[str]:
    """Everything that makes this configuration unsafe to serve, one line each."""
    from app.api.startup_guard import configuration_problems

    problems = configuration_problems(settings)
    if not settings.database_url:
        return [*problems, "DLW_DATABASE_URL is not set (the API connects as dlw_app)"]
    from app.db.connect import Unreachable

    try:
        return [*problems, *asyncio.run(_database_problems(settings))]
    except Unreachable as exc:
        return [*problems, str(exc)]
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return [*problems, f"DLW_DATABASE_URL: cannot connect ({exc.__class__.__name__}: {exc})"]


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

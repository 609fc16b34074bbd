"""`dlw serve`: refuse an unsafe configuration, else run the API under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from app.config import Settings, get_settings

NOT_MIGRATED = "not migrated: run dlw migrate (with DLW_MIGRATION_DATABASE_URL, a superuser URL)"


async def _schema_problem(url: str) -> str | None:
    """Why the database at url is not migrated to this version, or None (asked over the session
    URL, without named statements, so a pooler in front of it does not matter)."""
    from app.api.health import expected_schema
    from app.db.connect import connect_once
    from app.db.queries import SQL

    conn = await connect_once(url)
    try:
        try:
            row = await conn.fetchrow(SQL["schema_program"])
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.InsufficientPrivilegeError):
            return NOT_MIGRATED
        program, migrations = expected_schema()
        if row is None or row["program_sha256"] != program or not migrations <= set(row["migrations"]):
            return NOT_MIGRATED.replace("not migrated", "not migrated to this version")
        return None
    finally:
        await conn.close()


async def _database_problems(settings: Settings) -> list[str]:
    """The refusals about the database URLs: a role that defeats RLS, a pooler without a
    session URL (in dev mode too: grants and snapshots would silently stop), a schema that is
    not this version's."""
    from app.db.connect import Endpoints, PoolerMisconfigured, resolve_endpoints, role_problems

    assert settings.database_url
    try:
        endpoints = await resolve_endpoints(settings)
    except PoolerMisconfigured as exc:
        url = settings.database_url
        roles = await role_problems(Endpoints(url=url, direct_url=url, pooled=True))
        return [*([] if settings.auth_dev_mode else roles), str(exc)]
    roles = [] if settings.auth_dev_mode else await role_problems(endpoints)
    schema = await _schema_problem(endpoints.direct_url)
    return [*roles, *([f"DLW_DATABASE_URL: {schema}"] if schema else [])]


def refusals(settings: Settings) -> list[str]:
    """Everything that makes this configuration unsafe to serve, one line each."""
    from app.api.startup_guard import configuration_problems

    problems = configuration_problems(settings)
    if not settings.database_url:
        return [*problems, "DLW_DATABASE_URL is not set (the API connects as dlw_app)"]
    from app.db.connect import Unreachable
    from app.operator_errors import describe, one_line

    try:
        return [*problems, *asyncio.run(_database_problems(settings))]
    except Unreachable as exc:  # "SETTING: cannot connect (...)": said the operator's way when we can
        what = describe(exc.__cause__) if exc.__cause__ is not None else None
        return [*problems, f"{str(exc).split(':', 1)[0]}: {what}" if what else str(exc)]
    except Exception as exc:  # any connection failure is the operator's to fix, in one line
        what = describe(exc)
        if what is None and not isinstance(exc, ValueError):
            raise
        return [*problems, f"DLW_DATABASE_URL: {what or one_line(exc)}"]


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
    # log_config=None: uvicorn's loggers propagate to the handler app/logs.py installed (text or
    # JSON); its own access line is replaced by dlw.access (app/api/request_context.py), which
    # knows the route template, the request id and the principal.
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        access_log=False,
        **uvicorn_options(settings),
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.operator_errors import settings_problems

    try:
        settings = get_settings()
    except Exception as exc:  # a DLW_* value that does not parse is a refusal like the others
        problems = settings_problems(exc)
        if not problems:
            raise
        for line in problems:
            print(f"dlw: refusing to start: {line}", file=sys.stderr)
        return 2
    return serve(settings, args.host, args.port)

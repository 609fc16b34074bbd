"""The `dlw` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from app.config import DEFAULT_JWT_SECRET, Settings, get_settings
from app.domain import ROLES


def _migration_url(args: argparse.Namespace, settings: Settings) -> str:
    url = args.database_url or settings.migration_database_url
    if not url:
        sys.exit("dlw: no migration database URL: pass --database-url or set DLW_MIGRATION_DATABASE_URL")
    return str(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.ops.migrate import migrate

    result = migrate(_migration_url(args, get_settings()), force_program=args.reapply_sql)
    applied = ", ".join(result.applied) or "none pending"
    program = "re-applied" if result.program_applied else "unchanged"
    print(f"migrations applied: {applied}; sql program {program} ({result.program_sha256[:12]})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from app.ops.catalog_check import check_catalog

    problems = check_catalog(_migration_url(args, get_settings()))
    if problems:
        print(f"dlw doctor: {len(problems)} problem(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(
        "dlw doctor: catalog OK (RLS forced with dlw_app policies on every tenant table, "
        "definer functions allowlisted with their owners, roles sane, reporting views security_invoker)"
    )
    return 0


def _refusals(settings: Settings) -> list[str]:
    """Everything that makes this configuration unsafe to serve, one line each."""
    import asyncio

    import asyncpg

    from app.api.startup_guard import configuration_problems
    from app.db.pool import role_safety_problem

    problems = configuration_problems(settings)
    if not settings.database_url:
        return [*problems, "DLW_DATABASE_URL is not set (the API connects as dlw_app)"]

    async def check_role(url: str) -> str | None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await role_safety_problem(conn)
        finally:
            await conn.close()

    try:
        role_problem = asyncio.run(check_role(settings.database_url))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return [*problems, f"DLW_DATABASE_URL: cannot connect ({exc.__class__.__name__}: {exc})"]
    if role_problem and not settings.auth_dev_mode:
        problems.append(f"DLW_DATABASE_URL: {role_problem}")
    return problems


def _serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from app.api.factory import create_app

    problems = _refusals(settings)
    if problems:
        for line in problems:
            print(f"dlw: refusing to start: {line}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve(get_settings(), args.host, args.port)


def cmd_dev(args: argparse.Namespace) -> int:
    from app.ops.dev import DEV_TENANT_RULES, data_cluster, dev_secret, login_instructions, prepare_database

    base = get_settings()
    data_dir = Path(args.data_dir or base.data_dir)
    cluster = data_cluster(data_dir)
    print(f"dlw dev: embedded PostgreSQL in {cluster.datadir}")
    # uvicorn re-raises the signal that stopped it; turn SIGTERM into SystemExit so the
    # embedded PostgreSQL below is still stopped cleanly (SIGINT already raises).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cluster.start()
    try:
        app_url = prepare_database(cluster)
        update: dict[str, object] = {"database_url": app_url, "auth_dev_mode": True}
        if base.system_jwt_secret == DEFAULT_JWT_SECRET:
            update["system_jwt_secret"] = dev_secret(data_dir)
        if base.auth_tenant_rules_json.strip() in ("", "[]"):
            update["auth_tenant_rules_json"] = DEV_TENANT_RULES
        settings = base.model_copy(update=update)
        print(f"dlw dev: migrated; connect as superuser with: psql '{cluster.url('dlw')}'")
        print(f"dlw dev: API on http://{args.host}:{args.port} (dev mode, database role dlw_app)")
        print(login_instructions(args.host, args.port))
        return _serve(settings, args.host, args.port)
    finally:
        if not args.keep_db_running:
            cluster.stop()


def cmd_token_issue(args: argparse.Namespace) -> int:
    import psycopg

    from app.api.startup_guard import MIN_SECRET_BYTES
    from app.identity import system_jwt
    from app.identity.principal import Principal

    settings = get_settings()
    secret = settings.system_jwt_secret
    if not settings.auth_dev_mode and (secret == DEFAULT_JWT_SECRET or len(secret.encode()) < MIN_SECRET_BYTES):
        print(f"dlw: DLW_SYSTEM_JWT_SECRET is the default or shorter than {MIN_SECRET_BYTES} bytes", file=sys.stderr)
        return 2
    if args.tenant is None:
        if args.role != "executor":
            print("dlw: --tenant is required (only executor tokens may span all tenants)", file=sys.stderr)
            return 2
        tenant_id = 0  # a system-wide executor: its tenant context matches no tenant's rows
    else:
        url = args.database_url or settings.database_url or settings.migration_database_url
        if not url:
            print(
                "dlw: no database to resolve the tenant: pass --database-url or set DLW_DATABASE_URL", file=sys.stderr
            )
            return 2
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT tenant_id, active FROM dlw.resolve_tenant(%s)", (args.tenant,)).fetchone()
        if row is None:
            print(f"dlw: no tenant {args.tenant!r}", file=sys.stderr)
            return 2
        if not row[1]:
            print(f"dlw: tenant {args.tenant!r} is deactivated", file=sys.stderr)
            return 2
        tenant_id = int(row[0])
    user = args.user or f"cli:{args.role}"
    principal = Principal(user_id=user, tenant_id=tenant_id, role=args.role, is_service=args.user is None)
    print(system_jwt.issue(secret, principal, args.ttl or settings.system_jwt_ttl_seconds))
    return 0


def cmd_executor_run(args: argparse.Namespace) -> int:
    from app.executor.reference import run_command

    return run_command(args, get_settings())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlw", description="DLW control plane")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (connects as dlw_app via DLW_DATABASE_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dev", help="embedded PostgreSQL + migrations + demo tenants + API in dev mode")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="where the embedded database lives (default: DLW_DATA_DIR or .dlw)")
    p.add_argument("--keep-db-running", action="store_true", help="leave PostgreSQL running on exit")
    p.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="system JWTs").add_subparsers(dest="token_command", required=True)
    p = token.add_parser("issue", help="mint a system JWT and print only the token")
    p.add_argument("--tenant", help="tenant slug or id (optional only for --role executor: all tenants)")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--user", help="subject of the token (default: cli:<role>, marked as a service)")
    p.add_argument("--ttl", type=_positive_int, help="lifetime in seconds (default: DLW_SYSTEM_JWT_TTL_SECONDS)")
    p.add_argument("--database-url", help="to resolve the tenant (default: DLW_DATABASE_URL, then the migration URL)")
    p.set_defaults(func=cmd_token_issue)

    executor = sub.add_parser("executor", help="the reference executor").add_subparsers(
        dest="executor_command", required=True
    )
    p = executor.add_parser("run", help="claim, download and report files until SIGTERM (see docs/executors.md)")
    from app.executor.reference import add_run_arguments

    add_run_arguments(p)
    p.set_defaults(func=cmd_executor_run)

    from app.ops.admin_cli import add_admin_commands

    add_admin_commands(sub)  # tenant ..., reporting-login ... (DBA functions, sql/9x_dlw_admin_*.sql)

    for name, func, text in (
        ("migrate", cmd_migrate, "apply pending migrations, then the sql/ program"),
        ("doctor", cmd_doctor, "audit the catalog for the isolation invariants"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--database-url", help="owner/superuser URL (default: DLW_MIGRATION_DATABASE_URL)")
        if name == "migrate":
            p.add_argument("--reapply-sql", action="store_true", help="re-apply sql/ even if unchanged")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DLW_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("yoyo").setLevel(logging.WARNING)  # one line per step is noise
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))

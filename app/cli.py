"""The `dlw` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from app.config import Settings, get_settings


def _migration_url(args: argparse.Namespace, settings: Settings) -> str:
    url = args.database_url or settings.migration_database_url
    if not url:
        sys.exit("dlw: no migration database URL: pass --database-url or set DLW_MIGRATION_DATABASE_URL")
    return str(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import migrate

    result = migrate(_migration_url(args, get_settings()), force_program=args.reapply_sql)
    applied = ", ".join(result.applied) or "none pending"
    program = "re-applied" if result.program_applied else "unchanged"
    print(f"migrations applied: {applied}; sql program {program} ({result.program_sha256[:12]})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from app.doctor import audit

    problems = audit(_migration_url(args, get_settings()))
    if problems:
        print(f"dlw doctor: {len(problems)} problem(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(
        "dlw doctor: catalog OK (RLS forced with dlw_app policies on every tenant table, "
        "definer functions allowlisted, roles sane, reporting views security_invoker)"
    )
    return 0


def _serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve(get_settings(), args.host, args.port)


def cmd_dev(args: argparse.Namespace) -> int:
    from app.dev import data_cluster, prepare_database

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
        settings = base.model_copy(update={"database_url": app_url, "auth_dev_mode": True})
        print(f"dlw dev: migrated; connect as superuser with: psql '{cluster.url('dlw')}'")
        print(f"dlw dev: API on http://{args.host}:{args.port} (dev mode, database role dlw_app)")
        return _serve(settings, args.host, args.port)
    finally:
        if not args.keep_db_running:
            cluster.stop()


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

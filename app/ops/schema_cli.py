"""`dlw migrate` and `dlw doctor`: run the schema tools and print their one-screen summary."""

from __future__ import annotations

import argparse
import sys

from app.config import get_settings


def migration_url(args: argparse.Namespace) -> str:
    url = args.database_url or get_settings().migration_database_url
    if not url:
        sys.exit("dlw: no migration database URL: pass --database-url or set DLW_MIGRATION_DATABASE_URL")
    return str(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.ops.lock_waits import MigrateLockTimeout
    from app.ops.migrate import migrate

    try:
        result = migrate(
            migration_url(args),
            force_program=args.reapply_sql,
            lock_timeout=args.lock_timeout,
            lock_attempts=args.lock_attempts,
        )
    except MigrateLockTimeout as exc:
        print(f"dlw migrate: {exc}", file=sys.stderr)
        return 1
    applied = ", ".join(result.applied) or "none pending"
    program = "re-applied" if result.program_applied else "unchanged"
    print(f"migrations applied: {applied}; sql program {program} ({result.program_sha256[:12]})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from app.ops.catalog_check import check_catalog

    if getattr(args, "citus", False):
        return _doctor_citus(migration_url(args))
    problems = check_catalog(migration_url(args))
    if problems:
        print(f"dlw doctor: {len(problems)} problem(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(
        "dlw doctor: catalog OK (RLS forced with dlw_app policies on every tenant table, "
        "definer functions allowlisted, advisory locks for the platform only, roles sane, "
        "reporting views security_invoker)"
    )
    return 0


def _doctor_citus(url: str) -> int:
    """`dlw doctor --citus`: whether the schema stays distributable by tenant_id (docs/scale-out.md)."""
    from app.ops.citus_check import KNOWN_OBSTACLES, distributable_problems, distribution_plan

    problems = distributable_problems(url)
    if problems:
        print(f"dlw doctor --citus: {len(problems)} problem(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    plan = distribution_plan(url)
    distributed = [name for name, how in plan if how == "distributed by tenant_id"]
    print(
        f"dlw doctor --citus: distributable ({len(distributed)} tenant tables keyed by tenant_id, "
        f"{len(plan) - len(distributed)} global tables listed, {len(KNOWN_OBSTACLES)} known obstacle(s))"
    )
    for name, how in plan:
        print(f"  {name}: {how}")
    for obstacle, plan_text in KNOWN_OBSTACLES.items():
        print(f"  known obstacle: {obstacle} -- {plan_text}")
    return 0

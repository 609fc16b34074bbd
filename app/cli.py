"""The `dlw` command line: argument parsing and dispatch only. Each command lives with its
layer: app/ops/ (serve, dev, migrate/doctor, token, DBA commands) and app/executor/."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

from app.domain import ROLES

Command = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class LazyCommand:
    """A command imported only when it runs, so `dlw --help` and each command load only their own
    layer (the executor never imports the API or the migration tools)."""

    module: str
    name: str

    def resolve(self) -> Command:
        command: Command = getattr(import_module(self.module), self.name)
        return command

    def __call__(self, args: argparse.Namespace) -> int:
        return self.resolve()(args)


# Option types raise ArgumentTypeError themselves: for a plain ValueError argparse would name the
# function ("invalid _positive_int value") instead of saying what the option wants.
def _number(text: str, kind: type[int] | type[float], wants: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wants}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wants}")
    return value


def _positive_int(text: str) -> int:
    return int(_number(text, int, "a positive whole number of seconds"))


def _positive_float(text: str) -> float:
    return _number(text, float, "a positive number of seconds")


def _positive_int_count(text: str) -> int:
    return int(_number(text, int, "a positive whole number"))


def command_group(sub: argparse._SubParsersAction, name: str, help: str, dest: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """A command made of subcommands (`dlw token issue`): alone, it prints its help (exit 2)."""
    parser = sub.add_parser(name, help=help)
    parser.set_defaults(func=_HelpOf(parser))
    group: argparse._SubParsersAction = parser.add_subparsers(dest=dest, title="commands", metavar="COMMAND")  # type: ignore[type-arg]
    return group


@dataclass(frozen=True)
class _HelpOf:
    parser: argparse.ArgumentParser

    def __call__(self, _args: argparse.Namespace) -> int:
        self.parser.print_help(sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from app.executor.settings import add_run_arguments
    from app.ops.admin_cli import add_admin_commands

    parser = argparse.ArgumentParser(prog="dlw", description="DLW control plane")
    parser.set_defaults(func=_HelpOf(parser))
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the API (connects as dlw_app via DLW_DATABASE_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=LazyCommand("app.ops.serve", "cmd_serve"))

    p = sub.add_parser("dev", help="embedded PostgreSQL + migrations + demo tenants + API in dev mode")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="where the embedded database lives (default: DLW_DATA_DIR or .dlw)")
    p.add_argument("--keep-db-running", action="store_true", help="leave PostgreSQL running on exit")
    p.set_defaults(func=LazyCommand("app.ops.dev", "cmd_dev"))

    token = command_group(sub, "token", "system JWTs", "token_command")
    p = token.add_parser("issue", help="mint a system JWT and print only the token")
    p.add_argument("--tenant", help="tenant slug or id (optional only for --role executor: all tenants)")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--user", help="subject of the token (default: cli:<role>, marked as a service)")
    p.add_argument("--ttl", type=_positive_int, help="lifetime in seconds (default: DLW_SYSTEM_JWT_TTL_SECONDS)")
    p.add_argument("--database-url", help="to resolve the tenant (default: DLW_DATABASE_URL, then the migration URL)")
    p.set_defaults(func=LazyCommand("app.ops.token_cli", "cmd_token_issue"))

    p = sub.add_parser("openapi", help="print the API's OpenAPI document (committed as docs/openapi.json)")
    p.add_argument("--output", help="write it to this file instead (e.g. docs/openapi.json)")
    p.set_defaults(func=LazyCommand("app.ops.openapi_cli", "cmd_openapi"))

    executor = command_group(sub, "executor", "the reference executor", "executor_command")
    p = executor.add_parser(
        "run", help="claim, download and report files until SIGTERM (see docs/reference-executor.md)"
    )
    add_run_arguments(p)
    p.set_defaults(func=LazyCommand("app.executor.runner", "run_command"))

    add_admin_commands(sub)  # tenant ..., reporting-login ..., user ... (DBA functions, sql/9x_dlw_admin_*.sql)

    for name, func, text in (
        ("migrate", "cmd_migrate", "apply pending migrations, then the sql/ program"),
        ("doctor", "cmd_doctor", "audit the catalog for the isolation invariants"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--database-url", help="owner/superuser URL (default: DLW_MIGRATION_DATABASE_URL)")
        if name == "doctor":
            p.add_argument(
                "--citus", action="store_true", help="check instead that the schema stays distributable by tenant_id"
            )
        if name == "migrate":
            p.add_argument("--reapply-sql", action="store_true", help="re-apply sql/ even if unchanged")
            p.add_argument(
                "--lock-timeout",
                type=_positive_float,
                default=2.0,
                help="seconds to wait for one table lock before a step gives up and retries (default 2)",
            )
            p.add_argument(
                "--lock-attempts",
                type=_positive_int_count,
                default=5,
                help="attempts per step before migrate fails, with a doubling pause from 1 s (default 5)",
            )
        p.set_defaults(func=LazyCommand("app.ops.schema_cli", func))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from app.logs import configure_logging
    from app.operator_errors import reported

    with reported():
        try:
            configure_logging()
            args = build_parser().parse_args(argv)
            code = args.func(args)
        finally:  # even after --help: a closed pipe shows here, inside reported(), not at exit
            sys.stdout.flush()
    sys.exit(code)

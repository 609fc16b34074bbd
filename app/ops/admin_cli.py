"""`dlw tenant …`, `dlw reporting-login …` and `dlw user …`: thin wrappers over the dlw_admin SQL
functions.

Every command is one call of one dlw_admin function (sql/92_dlw_admin_tenants.sql,
sql/93_dlw_admin_logins.sql and sql/94_dlw_admin_support.sql) in its own transaction, so the CLI, psql and the docs
(docs/dba.md) do exactly the same thing and write the same audit rows. The connection is --database-url, by default
DLW_MIGRATION_DATABASE_URL; any login that is a member of dlw_admin works, no superuser needed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from app.config import get_settings
from app.domain import (
    DEFAULT_QUOTA_BYTES_MONTH,
    DEFAULT_QUOTA_CONCURRENT,
    DEFAULT_QUOTA_STORAGE_GB,
    DEFAULT_REPORTING_CONNECTION_LIMIT,
    DEFAULT_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    DEFAULT_REPORTING_STATEMENT_TIMEOUT_MS,
    DEFAULT_REPORTING_TEMP_FILE_LIMIT_KB,
    DEFAULT_REPORTING_TRANSACTION_TIMEOUT_MS,
    REPORTING_CONNECTION_LIMIT_MAX,
    TENANT_ROLES,
)
from app.ops.queries import query

# Transient conflicts worth one more try: the whole call rolled back, nothing was written.
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
ATTEMPTS = 3


class CommandError(Exception):
    """A refusal to report on stderr with exit code 1."""


def _url(args: argparse.Namespace) -> str:
    url = args.database_url or get_settings().migration_database_url
    if not url:
        raise CommandError("no database URL: pass --database-url or set DLW_MIGRATION_DATABASE_URL")
    return str(url)


def _print_notice(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
    print(f"dlw: notice: {message.message}", file=sys.stderr)


async def _call_once(url: str, name: str, params: Sequence[Any]) -> tuple[list[str], list[asyncpg.Record]]:
    conn = await asyncpg.connect(url)
    try:
        conn.add_log_listener(_print_notice)
        async with conn.transaction():
            statement = await conn.prepare(query(name))
            rows = await statement.fetch(*params)
        await asyncio.sleep(0)  # asyncpg hands notices to listeners via the loop: let them print
        return [a.name for a in statement.get_attributes()], rows
    finally:
        await conn.close()


async def _call_retrying(url: str, name: str, params: Sequence[Any]) -> tuple[list[str], list[asyncpg.Record]]:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await _call_once(url, name, params)
        except RETRYABLE:
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _call(args: argparse.Namespace, name: str, params: Sequence[Any] = ()) -> tuple[list[str], list[asyncpg.Record]]:
    """Run the named query (app/ops/queries.sql) in its own transaction; retry a deadlock or
    serialization failure. Returns the column names and the rows."""
    return asyncio.run(_call_retrying(_url(args), name, params))


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return "" if value is None else str(value)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- tenant -----------------------------------------------------------------------------------
def cmd_tenant_create(args: argparse.Namespace) -> int:
    _, rows = _call(
        args,
        "admin_create_tenant",
        (
            args.slug,
            args.display_name or args.slug,
            args.quota_concurrent,
            args.quota_bytes_month,
            args.quota_storage_gb,
        ),
    )
    print(f"created tenant {args.slug} (id {rows[0][0]})")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    columns, rows = _call(args, "admin_list_tenants")
    _print_table(columns, rows)
    return 0


def cmd_tenant_set_quota(args: argparse.Namespace) -> int:
    if args.concurrent is None and args.bytes_month is None and args.storage_gb is None:
        raise CommandError("nothing to set: give --concurrent, --bytes-month and/or --storage-gb")
    _, rows = _call(
        args,
        "admin_set_quota",
        (args.slug, args.concurrent, args.bytes_month, args.storage_gb),
    )
    concurrent, bytes_month, storage_gb = rows[0]
    print(
        f"tenant {args.slug}: concurrent={concurrent} bytes_month={bytes_month} storage_gb={storage_gb} (0 = unlimited)"
    )
    return 0


def cmd_tenant_deactivate(args: argparse.Namespace) -> int:
    _, rows = _call(args, "admin_deactivate_tenant", (args.slug, args.reason))
    tasks, files = rows[0]
    print(f"deactivated tenant {args.slug}: {tasks} task(s) and {files} file(s) cancelled")
    return 0


# -- reporting-login ----------------------------------------------------------------------------
def _password(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(password to set, password to print once)."""
    if args.no_password:
        return None, None
    if args.generate_password:
        generated = secrets.token_urlsafe(24)
        return generated, generated
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CommandError("--password-stdin: no password on standard input")
    return line, None


def cmd_login_create(args: argparse.Namespace) -> int:
    password, shown = _password(args)
    _call(args, "admin_create_reporting_login", (args.login, args.tenant, password))
    how = "password" if password is not None else "certificate/peer authentication (no password)"
    print(f"created reporting login {args.login} for tenant {args.tenant} ({how})")
    if shown is not None:
        print(f"password: {shown}")
    return 0


def cmd_login_set_limits(args: argparse.Namespace) -> int:
    given = (
        args.connection_limit,
        args.statement_timeout,
        args.idle_in_transaction_timeout,
        args.temp_file_limit,
        args.transaction_timeout,
    )
    if all(value is None for value in given):
        raise CommandError(
            "nothing to set: give --connection-limit, --statement-timeout, --idle-in-transaction-timeout,"
            " --temp-file-limit and/or --transaction-timeout"
        )
    _, rows = _call(args, "admin_set_reporting_login_limits", (args.login, *given))
    connections, statement, idle, temp_bytes, transaction = rows[0]
    print(
        f"reporting login {args.login}: connection_limit={connections}"
        f" statement_timeout={int(statement.total_seconds())}s"
        f" idle_in_transaction_timeout={int(idle.total_seconds())}s temp_file_limit={temp_bytes} bytes"
        f" transaction_timeout={int(transaction.total_seconds())}s"
    )
    return 0


def cmd_login_drop(args: argparse.Namespace) -> int:
    _call(args, "admin_drop_reporting_login", (args.login,))
    print(f"dropped reporting login {args.login}")
    return 0


# -- user -------------------------------------------------------------------------------------
def cmd_user_list(args: argparse.Namespace) -> int:
    columns, rows = _call(args, "admin_list_users", (args.tenant,))
    _print_table(columns, rows)
    return 0


def cmd_user_grant_role(args: argparse.Namespace) -> int:
    _, rows = _call(args, "admin_grant_role", (args.tenant, args.user, args.role))
    print(f"{'granted' if rows[0][0] else 'already granted'}: {args.role} to {args.user} in tenant {args.tenant}")
    return 0


def cmd_user_revoke_role(args: argparse.Namespace) -> int:
    _, rows = _call(args, "admin_revoke_role", (args.tenant, args.user, args.role))
    print(f"{'revoked' if rows[0][0] else 'not granted'}: {args.role} of {args.user} in tenant {args.tenant}")
    return 0


# -- registration ---------------------------------------------------------------------------------
def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn database refusals into one line on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as exc:
            print(f"dlw: {exc}", file=sys.stderr)
            return 1
        except asyncpg.PostgresError as exc:
            # The server's own words: primary message, SQLSTATE, hint (as psql shows them).
            message = exc.message or str(exc).strip()
            code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
            hint = f"\n  hint: {exc.hint}" if exc.hint else ""
            print(f"dlw: {message}{code}{hint}", file=sys.stderr)
            return 1
        except (OSError, TimeoutError) as exc:
            print(f"dlw: cannot connect to the database: {str(exc).strip() or type(exc).__name__}", file=sys.stderr)
            return 1
        except asyncpg.InterfaceError as exc:  # the driver refused before the server saw anything
            print(f"dlw: {str(exc).strip()}", file=sys.stderr)
            return 1

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def _runs(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """Finish a subcommand: its last option, --database-url, and the command it runs (guarded)."""
    parser.add_argument(
        "--database-url",
        help="a superuser or dlw_admin member login (default: DLW_MIGRATION_DATABASE_URL)",
    )
    parser.set_defaults(func=_guarded(func))


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = unlimited)")
    return value


# Defaults shown in --help (dlw_admin.create_tenant applies the database's own).
QUOTA_TIB = DEFAULT_QUOTA_BYTES_MONTH >> 40
QUOTA_GB = DEFAULT_QUOTA_STORAGE_GB
IDLE_S = DEFAULT_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_MS // 1000


def add_admin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `tenant create|list|set-quota|deactivate`, `reporting-login create|set-limits|drop` and
    `user list|grant-role|revoke-role`."""
    from app.cli import command_group

    tsub = command_group(
        subparsers, "tenant", "tenants: create, list, set quotas, deactivate (dlw_admin.*)", "tenant_command"
    )

    p = tsub.add_parser("create", help="create a tenant with its default project and storage target")
    p.add_argument("slug", help="short name: a lowercase letter, then lowercase letters, digits or hyphens")
    p.add_argument("--display-name", help="human-readable name (default: the slug)")
    p.add_argument(
        "--quota-concurrent",
        type=_non_negative,
        help=f"max live tasks (default {DEFAULT_QUOTA_CONCURRENT}; 0 = unlimited)",
    )
    p.add_argument(
        "--quota-bytes-month",
        type=_non_negative,
        help=f"max bytes per UTC month (default {QUOTA_TIB} TiB)",
    )
    p.add_argument("--quota-storage-gb", type=_non_negative, help=f"storage allowance in GB (default {QUOTA_GB})")
    _runs(p, cmd_tenant_create)

    p = tsub.add_parser("list", help="every tenant with its usage against its limits")
    _runs(p, cmd_tenant_list)

    p = tsub.add_parser("set-quota", help="change a tenant's limits (omitted ones are kept; 0 = unlimited)")
    p.add_argument("slug")
    p.add_argument("--concurrent", type=_non_negative, help="max live (pending or running) tasks")
    p.add_argument("--bytes-month", type=_non_negative, help="max bytes per UTC month")
    p.add_argument("--storage-gb", type=_non_negative, help="storage allowance in GB")
    _runs(p, cmd_tenant_set_quota)

    p = tsub.add_parser(
        "deactivate", help="refuse the tenant's logins and new tasks and cancel its live tasks; data stays readable"
    )
    p.add_argument("slug")
    p.add_argument("--reason", help="recorded in the tenant's audit trail")
    _runs(p, cmd_tenant_deactivate)

    lsub = command_group(
        subparsers, "reporting-login", "database logins for BI tools, one tenant each", "login_command"
    )

    p = lsub.add_parser("create", help="create a login that sees only one tenant's rows (schema reporting)")
    p.add_argument("login", help="the database role name to create")
    p.add_argument("--tenant", required=True, help="tenant slug")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    how.add_argument("--generate-password", action="store_true", help="generate a password and print it once")
    how.add_argument("--no-password", action="store_true", help="no password: certificate or peer authentication")
    _runs(p, cmd_login_create)

    p = lsub.add_parser(
        "set-limits", help="change a login's connection limit, timeouts and temp file limit (omitted ones are kept)"
    )
    p.add_argument("login")
    p.add_argument(
        "--connection-limit",
        type=int,
        help=f"max connections (default {DEFAULT_REPORTING_CONNECTION_LIMIT}; 1 to {REPORTING_CONNECTION_LIMIT_MAX})",
    )
    p.add_argument(
        "--statement-timeout",
        type=int,
        metavar="SECONDS",
        help=f"longest statement (default {DEFAULT_REPORTING_STATEMENT_TIMEOUT_MS // 1000} s)",
    )
    p.add_argument(
        "--idle-in-transaction-timeout",
        type=int,
        metavar="SECONDS",
        help=f"longest idle time in a transaction (default {IDLE_S} s)",
    )
    p.add_argument(
        "--temp-file-limit",
        type=int,
        metavar="BYTES",
        help=f"temporary file space per session (default {DEFAULT_REPORTING_TEMP_FILE_LIMIT_KB * 1024} bytes)",
    )
    p.add_argument(
        "--transaction-timeout",
        type=int,
        metavar="SECONDS",
        help=f"longest transaction, however busy (default {DEFAULT_REPORTING_TRANSACTION_TIMEOUT_MS // 1000} s)",
    )
    _runs(p, cmd_login_set_limits)

    p = lsub.add_parser("drop", help="remove a reporting login (and its role, if DLW created it)")
    p.add_argument("login")
    _runs(p, cmd_login_drop)

    usub = command_group(subparsers, "user", "a tenant's users and the roles granted to them", "user_command")
    p = usub.add_parser("list", help="the tenant's users: email (verified or not), role, granted roles")
    p.add_argument("tenant", help="tenant slug")
    _runs(p, cmd_user_list)
    for name, func, what in (
        ("grant-role", cmd_user_grant_role, "grant a user a tenant role on top of their own"),
        ("revoke-role", cmd_user_revoke_role, "revoke a role granted with grant-role"),
    ):
        p = usub.add_parser(name, help=what)
        p.add_argument("tenant", help="tenant slug")
        p.add_argument("user", help="user id, or an email the identity provider verified, held by one user only")
        p.add_argument("role", choices=TENANT_ROLES)
        _runs(p, func)

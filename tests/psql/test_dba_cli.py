"""The `dlw tenant` / `dlw reporting-login` CLI wraps the same dlw_admin functions, run as a
dlw_admin login that is no superuser (tests/support/dba.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

from app.ops.admin_cli import add_admin_commands
from tests.support.database import MigratedDb
from tests.support.dba import Dba, audit_rows, dba, role_exists
from tests.support.psql import ok

__all__ = ["dba"]  # the module's DBA login (tests/support/dba.py)


# -- the CLI ----------------------------------------------------------------------------------
def cli(dba: Dba, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dlw")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--database-url", dba.url])
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = args.func(args)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def test_cli_wraps_the_same_functions(db: MigratedDb, dba: Dba):
    code, out, _ = cli(dba, "tenant", "create", "cli-co", "--display-name", "CLI Co", "--quota-concurrent", "7")
    assert code == 0 and out.startswith("created tenant cli-co (id ")
    code, out, err = cli(dba, "tenant", "create", "cli-co")
    assert code == 1 and "[DLWA2]" in err and "already exists" in err
    code, out, _ = cli(dba, "tenant", "set-quota", "cli-co", "--bytes-month", "5000", "--storage-gb", "0")
    assert code == 0 and out.strip() == "tenant cli-co: concurrent=7 bytes_month=5000 storage_gb=0 (0 = unlimited)"
    code, out, err = cli(dba, "tenant", "set-quota", "cli-co")
    assert code == 1 and "nothing to set" in err
    code, out, _ = cli(dba, "tenant", "list")
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["tenant_id", "slug", "display_name"]
    assert any(line.split()[1:3] == ["cli-co", "CLI"] and " 7 " in line and "5000" in line for line in lines)

    generated = dba.new_login("rep_cli")
    code, out, _ = cli(dba, "reporting-login", "create", generated, "--tenant", "cli-co", "--generate-password")
    assert code == 0 and f"created reporting login {generated} for tenant cli-co (password)" in out
    password = out.split("password: ")[1].strip()
    assert ok(db.url(generated, password), "SELECT slug FROM reporting.quota_status;") == "cli-co\n"
    piped = dba.new_login("rep_cli")
    code, out, _ = cli(
        dba, "reporting-login", "create", piped, "--tenant", "cli-co", "--password-stdin", stdin="s3cret\n"
    )
    assert code == 0 and ok(db.url(piped, "s3cret"), "SELECT 1;") == "1\n"
    cert = dba.new_login("rep_cli")
    code, out, _ = cli(dba, "reporting-login", "create", cert, "--tenant", "cli-co", "--no-password")
    assert code == 0 and "no password" in out
    for name in (generated, piped, cert):
        code, out, _ = cli(dba, "reporting-login", "drop", name)
        assert code == 0 and not role_exists(db, name)
    code, _, err = cli(dba, "reporting-login", "drop", cert)
    assert code == 1 and "[DLWA4]" in err

    code, out, _ = cli(dba, "tenant", "deactivate", "cli-co", "--reason", "test")
    assert code == 0 and out.strip() == "deactivated tenant cli-co: 0 task(s) and 0 file(s) cancelled"
    assert {r[0] for r in audit_rows(db, "cli-co")} == {dba.login}

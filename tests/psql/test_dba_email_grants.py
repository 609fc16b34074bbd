"""Identity that cannot be borrowed, in SQL: dlw.login_user keeps only a verified email, the
API's role cannot write one, and a DBA's grant by email (dlw_admin, psql and `dlw user`)
reaches only a verified address that one user of the tenant holds."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from app.ops.admin_cli import add_admin_commands
from tests.support.database import MigratedDb
from tests.support.psql import psql, sqlstates
from tests.support.tenants import dba_login, tenant

ISSUER = "https://idp.example"


@pytest.fixture(scope="module")
def dba_url(db: MigratedDb) -> Iterator[str]:
    with dba_login(db) as url:
        yield url


@pytest.fixture(scope="module")
def papa(db: MigratedDb) -> int:
    return tenant(db, "papa", name="Papa")


def login_user(db: MigratedDb, subject: str, email: str | None, verified: bool | None) -> str:
    """dlw.login_user as the API calls it (dlw_app, no context); a new identity goes to papa."""
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT outcome FROM dlw.login_user(%s, %s, %s, %s, 'papa', 'tenant_viewer')",
            (ISSUER, subject, email, verified),
        ).fetchone()
    return str(row[0])


def stored(db: MigratedDb, subject: str) -> tuple[str | None, bool]:
    with db.owner() as conn:
        row = conn.execute("SELECT email, email_verified FROM dlw.users WHERE subject = %s", (subject,)).fetchone()
    return row[0], row[1]


def user_id(db: MigratedDb, subject: str) -> str:
    with db.owner() as conn:
        return str(conn.execute("SELECT id FROM dlw.users WHERE subject = %s", (subject,)).fetchone()[0])


def dba_fails(dba_url: str, script: str) -> tuple[str, str]:
    """(SQLSTATE, the error line psql printed) of a statement that must fail."""
    result = psql(dba_url, script)
    assert result.returncode == 3, result.stdout + result.stderr
    codes = sqlstates(result.stderr)
    assert len(codes) == 1, result.stderr
    return codes[0], result.stderr


def test_only_a_verified_email_is_stored_at_every_login(db: MigratedDb, papa: int):
    assert login_user(db, "uma", "uma@papa.example", False) == "ok"
    assert stored(db, "uma") == (None, False)
    assert login_user(db, "uma", "uma@papa.example", True) == "ok"
    assert stored(db, "uma") == ("uma@papa.example", True)
    # A later login with the address unverified (or absent, or no flag at all) does not keep it.
    for email, verified in (("someone.else@papa.example", False), (None, True), ("uma@papa.example", None)):
        assert login_user(db, "uma", "uma@papa.example", True) == "ok"
        assert login_user(db, "uma", email, verified) == "ok"
        assert stored(db, "uma") == (None, False), (email, verified)
    with db.owner() as conn:
        details = [
            r[0]
            for r in conn.execute(
                "SELECT detail FROM dlw.audit_log WHERE action = 'auth.login' AND actor = %s ORDER BY at, id",
                (f"oidc:{ISSUER}#uma",),
            )
        ]
    assert [d["email_verified"] for d in details] == [False, True, True, False, True, False, True, False]


def test_the_api_role_cannot_write_an_email(db: MigratedDb, papa: int):
    login_user(db, "vera", "vera@papa.example", True)
    with psycopg.connect(db.app_url) as conn:
        conn.execute("SELECT dlw.set_context(%s, NULL, 'tenant_admin')", (papa,))
        for column in ("email", "email_verified"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute(
                        sql.SQL("UPDATE dlw.users SET {} = {} WHERE subject = 'vera'").format(
                            sql.Identifier(column), sql.Literal("boss@papa.example" if column == "email" else True)
                        )
                    )
    assert stored(db, "vera") == ("vera@papa.example", True)
    with db.owner() as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE dlw.users SET email = NULL, email_verified = true WHERE subject = 'vera'")


def test_grant_by_email_needs_a_verified_address_held_by_one_user(db: MigratedDb, papa: int, dba_url: str):
    login_user(db, "quin", "Quin@Papa.example", True)
    # A case variant of the stored address names the same user.
    assert psql(dba_url, "SELECT dlw_admin.grant_role('papa', 'QUIN@papa.EXAMPLE', 'tenant_operator');").stdout == "t\n"
    # A row from before migration 0010: an address of unknown standing, so it is not verified.
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, role)"
            " VALUES (%s, %s, 'old', %s, 'tenant_viewer')",
            (papa, ISSUER, "old@papa.example"),
        )
    code, line = dba_fails(dba_url, "SELECT dlw_admin.grant_role('papa', 'old@papa.example', 'tenant_admin');")
    assert code == "DLWA8" and "was not verified by the identity provider" in line
    assert user_id(db, "old") not in line, "no id to copy: who holds the address is for the DBA to find out"
    # By id, a deliberate choice, it works.
    old = user_id(db, "old")
    assert psql(dba_url, f"SELECT dlw_admin.revoke_role('papa', '{old}', 'tenant_admin');").stdout == "f\n"
    # Two users with one address, in any case, verified or not: ambiguous, refused.
    login_user(db, "quin-twin", "quin@papa.EXAMPLE", True)
    code, line = dba_fails(dba_url, "SELECT dlw_admin.grant_role('papa', 'quin@papa.example', 'tenant_admin');")
    assert code == "DLWA9" and "is shared by 2 users of tenant" in line
    with db.owner() as conn:
        conn.execute("UPDATE dlw.users SET email = 'QUIN@papa.example', email_verified = false WHERE subject = 'old'")
    assert dba_fails(dba_url, "SELECT dlw_admin.revoke_role('papa', 'quin@papa.example', 'tenant_operator');")[0] == (
        "DLWA9"
    )
    with db.owner() as conn:
        assert conn.execute(
            "SELECT v1 FROM dlw.casbin_rule WHERE ptype = 'g' AND v0 = %s", (f"user:{user_id(db, 'quin')}",)
        ).fetchall() == [("tenant_operator",)]
        assert conn.execute(
            "SELECT count(*) FROM dlw.casbin_rule WHERE v0 IN (%s, %s)",
            (f"user:{old}", f"user:{user_id(db, 'quin-twin')}"),
        ).fetchone() == (0,)


def cli(dba_url: str, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dlw")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--database-url", dba_url])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_the_cli_grants_by_verified_email_and_prints_a_refusal_as_one_line(db: MigratedDb, papa: int, dba_url: str):
    login_user(db, "rita", "rita@papa.example", True)
    login_user(db, "sam", "sam@papa.example", False)
    code, out, _ = cli(dba_url, "user", "grant-role", "papa", "Rita@papa.example", "tenant_admin")
    assert code == 0 and out == "granted: tenant_admin to Rita@papa.example in tenant papa\n"
    code, out, _ = cli(dba_url, "user", "grant-role", "papa", "rita@papa.example", "tenant_admin")
    assert code == 0 and out.startswith("already granted")
    code, out, err = cli(dba_url, "user", "grant-role", "papa", "sam@papa.example", "tenant_admin")
    assert (code, out) == (1, "") and err == (
        f"dlw: no user 'sam@papa.example' in tenant {papa} [DLWA5]\n"
        "  hint: dlw_admin.list_users(tenant) lists the tenant's users\n"
    )
    with db.owner() as conn:  # sam's address from before migration 0010
        conn.execute("UPDATE dlw.users SET email = 'sam@papa.example' WHERE subject = 'sam'")
    code, out, err = cli(dba_url, "user", "grant-role", "papa", "sam@papa.example", "tenant_admin")
    assert code == 1 and err == (
        f"dlw: email 'sam@papa.example' in tenant {papa} was not verified by the identity provider:"
        " name the user by id [DLWA8]\n"
    )
    login_user(db, "rita-2", "RITA@papa.example", True)
    code, out, err = cli(dba_url, "user", "revoke-role", "papa", "rita@papa.example", "tenant_admin")
    assert code == 1 and err.count("\n") == 1 and err.endswith("name the user by id [DLWA9]\n")
    code, out, _ = cli(dba_url, "user", "list", "papa")
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["user_id", "email", "email_verified", "role"]
    assert any("sam@papa.example" in line and " False " in line and line.split()[4] == "-" for line in lines)
    assert any("rita@papa.example" in line and " True " in line and line.split()[4] == "tenant_admin" for line in lines)

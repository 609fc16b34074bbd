"""DBA administration of reporting logins through the real psql client: create, rotate, drop,
and what DLW refuses to touch (a role made elsewhere, a stale mapping to a role that is not a
plain reporting login) (tests/support/dba.py)."""

from __future__ import annotations

import json
import secrets

from psycopg import sql

from tests.support.database import MigratedDb
from tests.support.dba import Dba, audit_rows, dba, role_exists
from tests.support.psql import lit, ok, psql

__all__ = ["dba"]  # the module's DBA login (tests/support/dba.py)


# -- reporting logins -------------------------------------------------------------------------
def test_reporting_login_lifecycle(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('victor-login', 'Victor');")
    login = dba.new_login("rep_vl")
    dba.run(f"SELECT dlw_admin.create_reporting_login({lit(login)}, 'victor-login', 'first-password');")
    assert ok(db.url(login, "first-password"), "SELECT slug FROM reporting.quota_status;") == "victor-login\n"
    assert (
        dba.run(
            "SELECT slug, managed_role, role_exists, can_login FROM dlw_admin.list_reporting_logins('victor-login');"
        )
        == "victor-login|t|t|t\n"
    )
    # refusals, each leaving nothing behind
    stray = dba.new_login("rep_stray")
    assert dba.fails(f"SELECT dlw_admin.create_reporting_login({lit(login)}, 'victor-login', 'x');") == "DLWA3"
    assert dba.fails(f"SELECT dlw_admin.create_reporting_login({lit(dba.login)}, 'victor-login', 'x');") == "DLWA3"
    assert dba.fails("SELECT dlw_admin.create_reporting_login('postgres', 'victor-login', 'x');") == "DLWA3"
    for bad in ("Bad Name", "pg_sneaky", "dlw_app", "x" * 64, ""):
        assert dba.fails(f"SELECT dlw_admin.create_reporting_login({lit(bad)}, 'victor-login', 'x');") == "22023"
    assert dba.fails(f"SELECT dlw_admin.create_reporting_login({lit(stray)}, 'nope', 'x');") == "DLWA1"
    assert not role_exists(db, stray)
    # the role is created in the caller's transaction: a rollback takes it back
    dba.run(f"BEGIN; SELECT dlw_admin.create_reporting_login({lit(stray)}, 'victor-login', 'x'); ROLLBACK;")
    assert not role_exists(db, stray)
    # rotate the password
    dba.run(f"SELECT dlw_admin.set_reporting_login_password({lit(login)}, 'second-password');")
    assert psql(db.url(login, "first-password"), "SELECT 1;").returncode != 0
    assert ok(db.url(login, "second-password"), "SELECT count(*) FROM reporting.tasks;") == "0\n"
    # without a password: certificate or peer authentication only
    cert = dba.new_login("rep_cert")
    dba.run(f"SELECT dlw_admin.create_reporting_login({lit(cert)}, 'victor-login');")
    with db.owner() as conn:
        assert conn.execute(
            "SELECT rolcanlogin, rolpassword IS NULL, rolinherit FROM pg_authid WHERE rolname = %s", (cert,)
        ).fetchone() == (True, True, True)
        assert conn.execute(
            "SELECT array_agg(roleid::regrole::text) FROM pg_auth_members WHERE member = %s::regrole", (cert,)
        ).fetchone() == (["dlw_reporting"],)
    assert psql(db.url(cert, "anything"), "SELECT 1;").returncode != 0
    # drop: the mapping and the role go
    dba.run(f"SELECT dlw_admin.drop_reporting_login({lit(cert)});")
    assert not role_exists(db, cert)
    assert dba.fails(f"SELECT dlw_admin.drop_reporting_login({lit(cert)});") == "DLWA4"
    assert dba.fails(f"SELECT dlw_admin.set_reporting_login_password({lit(cert)}, 'x');") == "DLWA4"
    # a managed role that gained another membership is not dropped (and its mapping stays)
    db.server.execute(sql.SQL("GRANT dlw_admin TO {}").format(sql.Identifier(login)))
    assert dba.fails(f"SELECT dlw_admin.drop_reporting_login({lit(login)});") == "DLWA7"
    db.server.execute(sql.SQL("REVOKE dlw_admin FROM {}").format(sql.Identifier(login)))
    assert ok(db.url(login, "second-password"), "SELECT slug FROM reporting.quota_status;") == "victor-login\n"
    dba.run(f"SELECT dlw_admin.drop_reporting_login({lit(login)});")
    assert not role_exists(db, login)
    actions = [(r[1], r[2]) for r in audit_rows(db, "victor-login") if r[1].startswith("reporting_login.")]
    assert actions == [
        ("reporting_login.created", login),
        ("reporting_login.password_set", login),
        ("reporting_login.created", cert),
        ("reporting_login.dropped", cert),
        ("reporting_login.dropped", login),
    ]
    assert "second-password" not in json.dumps(audit_rows(db, "victor-login"))


def test_a_role_made_elsewhere_is_unmapped_but_kept(db: MigratedDb, dba: Dba):
    outside = dba.new_login("rep_outside")
    db.server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE dlw_reporting").format(sql.Identifier(outside))
    )
    with db.owner() as conn:
        conn.execute("INSERT INTO dlw.reporting_logins (tenant_id, login) VALUES (1, %s)", (outside,))
    assert dba.fails(f"SELECT dlw_admin.set_reporting_login_password({lit(outside)}, 'x');") == "DLWA7"
    result = psql(dba.url, f"SELECT dlw_admin.drop_reporting_login({lit(outside)});")
    assert result.returncode == 0 and "was not created by DLW" in result.stderr
    assert role_exists(db, outside)
    assert ok(db.url(outside, "pw"), "SELECT count(*) FROM reporting.quota_status;") == "0\n"


def test_a_stale_mapping_cannot_re_password_a_role_that_is_not_a_plain_reporting_login(db: MigratedDb, dba: Dba):
    login = dba.new_login("rep_stale")
    dba.run(f"SELECT dlw_admin.create_reporting_login('{login}', 'default', 'pw-{secrets.token_hex(4)}');")
    # Someone with superuser drops the login outside DLW and reuses the name for another role.
    db.server.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
    db.server.execute(sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS PASSWORD 'orig'").format(sql.Identifier(login)))
    assert dba.fails(f"SELECT dlw_admin.set_reporting_login_password('{login}', 'hijack');") in ("DLWA7", "42501")

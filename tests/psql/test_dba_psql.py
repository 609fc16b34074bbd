"""DBA administration through the real psql client, as a login that is a member of dlw_admin
and not a superuser: tenants, quotas, reporting logins, role grants, support access,
deactivation, the audit trail of all of it, and the `dlw tenant` / `dlw reporting-login` CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from app.api.factory import create_app
from app.ops.admin_cli import add_admin_commands
from app.ops.catalog_check import DEFINER_ALLOWLIST, check_catalog
from tests.support.app import app_settings, bearer, token
from tests.support.database import MigratedDb
from tests.support.psql import lit, ok, psql, sqlstates
from tests.support.tenants import as_tenant, create_dba_login, drop_login

PASSWORD = secrets.token_urlsafe(16)


class Dba:
    """A DBA login for this module: LOGIN, member of dlw_admin, no other attribute."""

    def __init__(self, db: MigratedDb) -> None:
        self.db = db
        self.login = f"dba_{secrets.token_hex(4)}"
        self.url = db.url(self.login, PASSWORD)
        self.logins: list[str] = [self.login]

    def run(self, script: str) -> str:
        return ok(self.url, script)

    def fails(self, script: str) -> str:
        """The SQLSTATE of a script that must fail."""
        result = psql(self.url, script)
        assert result.returncode == 3, result.stdout + result.stderr
        codes = sqlstates(result.stderr)
        assert len(codes) == 1, result.stderr
        return codes[0]

    def new_login(self, prefix: str) -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.logins.append(name)
        return name


@pytest.fixture(scope="module")
def dba(db: MigratedDb) -> Iterator[Dba]:
    d = Dba(db)
    create_dba_login(db, d.login, PASSWORD)
    yield d
    for login in reversed(d.logins):
        drop_login(db, login)


def audit_rows(db: MigratedDb, tenant: str, action: str | None = None) -> list[tuple[Any, ...]]:
    with db.owner() as conn:
        return conn.execute(
            "SELECT a.actor, a.action, a.target, a.detail FROM dlw.audit_log a JOIN dlw.tenants t USING (tenant_id)"
            " WHERE t.slug = %s AND (%s::text IS NULL OR a.action = %s) ORDER BY a.at, a.id",
            (tenant, action, action),
        ).fetchall()


def tenant_id(db: MigratedDb, slug: str) -> int:
    with db.owner() as conn:
        return int(conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug = %s", (slug,)).fetchone()[0])


def role_exists(db: MigratedDb, name: str) -> bool:
    with db.owner() as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


# -- the catalog ------------------------------------------------------------------------------
def test_the_dba_login_is_no_superuser(db: MigratedDb, dba: Dba):
    assert dba.run(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user;"
        "SELECT string_agg(roleid::regrole::text, ',') FROM pg_auth_members WHERE member = current_user::regrole;"
    ).split() == ["f|f|f|f", "dlw_admin"]


def test_dlw_admin_functions_are_pinned_commented_allowlisted_definers_only_dba_may_call(db: MigratedDb):
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT p.oid::regprocedure::text, p.prosecdef, pg_get_userbyid(p.proowner), p.proconfig,
                   obj_description(p.oid, 'pg_proc') IS NOT NULL,
                   (SELECT array_agg(DISTINCT a.grantee::regrole::text ORDER BY a.grantee::regrole::text)
                      FROM aclexplode(p.proacl) a WHERE a.privilege_type = 'EXECUTE')
            FROM pg_proc p WHERE p.pronamespace IN ('dlw_admin'::regnamespace)
               OR p.oid IN ('dlw.create_login_role(text,text)'::regprocedure,
                            'dlw.set_login_role_password(text,text)'::regprocedure,
                            'dlw.drop_login_role(text)'::regprocedure,
                            'dlw.set_login_role_limits(text,integer,integer,integer,integer)'::regprocedure)
            ORDER BY 1""").fetchall()
        internal_helpers = conn.execute("""
            SELECT p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc') IS NOT NULL,
                   has_function_privilege('dlw_admin', p.oid, 'EXECUTE')
            FROM pg_proc p WHERE p.pronamespace = 'dlw'::regnamespace AND p.proname LIKE 'admin\\_%'""").fetchall()
    assert len(rows) >= 19
    for name, definer, owner, config, commented, grantees in rows:
        assert definer and name in DEFINER_ALLOWLIST, name
        assert "search_path=pg_catalog, pg_temp" in config, name
        assert commented, f"{name} has no COMMENT"
        if name.startswith("dlw_admin."):
            assert (owner, grantees) == ("dlw_system", ["dlw_admin", "dlw_system"]), name
        else:
            assert (owner, grantees) == ("dlw_login_manager", ["dlw_login_manager", "dlw_system"]), name
    assert len(internal_helpers) == 5
    assert all(commented and not callable_by_dba for _, commented, callable_by_dba in internal_helpers)
    assert check_catalog(db.owner_url) == [], "dlw doctor stays green"


def test_the_login_manager_has_createrole_and_nothing_else(db: MigratedDb):
    with db.owner() as conn:
        assert conn.execute(
            "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolinherit"
            " FROM pg_roles WHERE rolname = 'dlw_login_manager'"
        ).fetchone() == (False, False, False, True, False, False, False)
        assert conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE roleid = 'dlw_login_manager'::regrole"
        ).fetchone() == (0,), "nobody is a member of it"
        assert conn.execute(
            "SELECT bool_or(admin_option) FROM pg_auth_members"
            " WHERE roleid = 'dlw_reporting'::regrole AND member = 'dlw_login_manager'::regrole"
        ).fetchone() == (True,)
        assert conn.execute("SELECT rolcreaterole FROM pg_roles WHERE rolname = 'dlw_system'").fetchone() == (False,), (
            "the RLS-bypassing role never gets CREATEROLE"
        )


# -- tenants ----------------------------------------------------------------------------------
def test_tenant_functions_work_refuse_with_exact_codes_and_audit_as_the_dba(db: MigratedDb, dba: Dba):
    assert dba.run("SELECT dlw_admin.create_tenant('tango', 'Tango Ltd', quota_concurrent => 3);").strip().isdigit()
    tid = tenant_id(db, "tango")
    with db.owner() as conn:
        assert conn.execute(
            "SELECT count(*) FROM dlw.projects WHERE tenant_id = %s AND is_default"
            " UNION ALL SELECT count(*) FROM dlw.storage_targets WHERE tenant_id = %s AND name = 'default'",
            (tid, tid),
        ).fetchall() == [(1,), (1,)]
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
            " VALUES (%s, 'bytes_month', 250, 'e1')",
            (tid,),
        )
    assert dba.run("SELECT * FROM dlw_admin.set_quota('tango', quota_bytes_month => 1000);") == "3|1000|1024\n"
    assert dba.run("SELECT * FROM dlw_admin.set_quota('tango', quota_storage_gb => 0);") == "3|1000|0\n"
    assert (
        dba.run(
            "SELECT live_tasks, quota_concurrent, bytes_used_month, quota_bytes_month, bytes_used_pct"
            " FROM dlw_admin.list_tenants() WHERE slug = 'tango';"
        )
        == "0|3|250|1000|25.00\n"
    )
    dba.run("SELECT dlw_admin.rename_tenant('tango', 'Tango Limited');")
    dba.run("SELECT dlw_admin.create_tenant('uniform', 'Uniform');")
    before = len(audit_rows(db, "tango"))
    refusals = {
        "SELECT dlw_admin.create_tenant('tango', 'Again');": "DLWA2",
        "SELECT dlw_admin.create_tenant('Bad Slug', 'x');": "22023",
        "SELECT dlw_admin.create_tenant('okay', '');": "22023",
        "SELECT dlw_admin.create_tenant('okay', 'x', quota_concurrent => -1);": "22023",
        "SELECT dlw_admin.set_quota('tango', quota_bytes_month => -5);": "22023",
        "SELECT dlw_admin.set_quota('nope', quota_concurrent => 1);": "DLWA1",
        "SELECT dlw_admin.rename_tenant('nope', 'x');": "DLWA1",
        "SELECT dlw_admin.rename_tenant('tango', NULL, new_slug => 'uniform');": "DLWA2",
        "SELECT dlw_admin.rename_tenant('tango', NULL, new_slug => '-x');": "22023",
        "SELECT dlw_admin.deactivate_tenant('nope');": "DLWA1",
        "SELECT dlw_admin.deactivate_tenant('default');": "DLWA6",
        "SELECT dlw_admin.deactivate_tenant('1');": "DLWA6",
        "SELECT dlw_admin.reactivate_tenant('nope');": "DLWA1",
        "SELECT dlw_admin.list_users('nope');": "DLWA1",
        "SELECT * FROM dlw_admin.view_as_tenant('nope', NULL::reporting.tasks);": "DLWA1",
        "SELECT * FROM dlw_admin.view_as_tenant('tango', NULL::dlw.tenants);": "22023",
        "SELECT * FROM dlw_admin.view_as_tenant('tango', 1);": "22023",
    }
    for statement, code in refusals.items():
        assert dba.fails(statement) == code, statement
    assert len(audit_rows(db, "tango")) == before, "a refusal writes nothing, not even its audit row"
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.tenants WHERE slug = 'okay'").fetchone() == (0,)
    rows = audit_rows(db, "tango")
    assert {r[0] for r in rows} == {dba.login}
    assert [r[1] for r in rows] == ["tenant.created", "tenant.quota_set", "tenant.quota_set", "tenant.renamed"]
    assert (
        rows[1][3]["before"]["quota_bytes_month"] == 1099511627776 and rows[1][3]["after"]["quota_bytes_month"] == 1000
    )
    assert rows[3][3]["after"] == {"slug": "tango", "display_name": "Tango Limited"}
    listed = audit_rows(db, "default", "admin.tenants_listed")
    assert listed and listed[-1][0] == dba.login


def test_dlw_admin_is_refused_to_everyone_else(db: MigratedDb):
    """dlw_app (the API role) and a login without dlw_admin cannot call the DBA functions."""
    with psycopg.connect(db.app_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema dlw_admin"):
            conn.execute("SELECT * FROM dlw_admin.list_tenants()")


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


# -- users and roles --------------------------------------------------------------------------
def test_grant_and_revoke_a_users_role(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('whiskey', 'Whiskey'); SELECT dlw_admin.create_tenant('xray', 'Xray');")
    with db.owner() as conn:
        ada = conn.execute(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, email_verified, role) SELECT tenant_id,"
            " 'https://idp', 'ada', 'Ada@Whiskey.example', true, 'tenant_viewer' FROM dlw.tenants"
            " WHERE slug = 'whiskey' RETURNING id"
        ).fetchone()[0]
        stranger = conn.execute(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, email_verified, role) SELECT tenant_id,"
            " 'https://idp', 'bob', 'bob@xray.example', true, 'tenant_admin' FROM dlw.tenants WHERE slug = 'xray'"
            " RETURNING id"
        ).fetchone()[0]
        for n in (1, 2):
            conn.execute(
                "INSERT INTO dlw.users (tenant_id, issuer, subject, email, email_verified, role) SELECT tenant_id,"
                " 'https://idp', %s, 'twin@whiskey.example', true, 'tenant_viewer' FROM dlw.tenants"
                " WHERE slug = 'whiskey'",
                (f"twin{n}",),
            )
    assert dba.run("SELECT dlw_admin.grant_role('whiskey', 'ada@whiskey.example', 'tenant_operator');") == "t\n"
    assert dba.run(f"SELECT dlw_admin.grant_role('whiskey', '{ada}', 'tenant_operator');") == "f\n"
    assert (
        dba.run(f"SELECT role, granted_roles FROM dlw_admin.list_users('whiskey') WHERE user_id = '{ada}';")
        == "tenant_viewer|{tenant_operator}\n"
    )
    with db.owner() as conn:
        assert conn.execute(
            "SELECT v1 FROM dlw.casbin_rule WHERE ptype = 'g' AND v0 = %s", (f"user:{ada}",)
        ).fetchall() == [("tenant_operator",)]
    assert dba.fails("SELECT dlw_admin.grant_role('whiskey', 'ada@whiskey.example', 'system_admin');") == "22023"
    assert dba.fails(f"SELECT dlw_admin.grant_role('whiskey', '{stranger}', 'tenant_admin');") == "DLWA5"
    assert dba.fails("SELECT dlw_admin.grant_role('whiskey', 'bob@xray.example', 'tenant_admin');") == "DLWA5"
    assert dba.fails("SELECT dlw_admin.grant_role('whiskey', 'twin@whiskey.example', 'tenant_admin');") == "DLWA9"
    assert dba.run("SELECT dlw_admin.revoke_role('whiskey', 'ada@whiskey.example', 'tenant_operator');") == "t\n"
    result = psql(dba.url, "SELECT dlw_admin.revoke_role('whiskey', 'ada@whiskey.example', 'tenant_viewer');")
    assert result.stdout == "f\n" and "is the user's own role" in result.stderr
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM dlw.casbin_rule WHERE v0 = %s", (f"user:{ada}",)).fetchone() == (0,)
    actions = [(r[0], r[1], r[3]["role"]) for r in audit_rows(db, "whiskey") if r[1].startswith("role.")]
    assert actions == [
        (dba.login, "role.granted", "tenant_operator"),
        (dba.login, "role.granted", "tenant_operator"),
        (dba.login, "role.revoked", "tenant_operator"),
        (dba.login, "role.revoked", "tenant_viewer"),
    ]


# -- support ----------------------------------------------------------------------------------
def test_view_as_tenant_shows_what_the_tenant_sees_read_only_and_tells_the_tenant(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('yankee', 'Yankee'); SELECT dlw_admin.create_tenant('zulu', 'Zulu');")
    yankee, zulu = tenant_id(db, "yankee"), tenant_id(db, "zulu")
    with db.owner() as conn:
        for tid, n in ((yankee, 3), (zulu, 5)):
            for i in range(n):
                conn.execute(
                    "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
                    " SELECT %s, p.id, s.id, %s, 'main' FROM dlw.projects p, dlw.storage_targets s"
                    " WHERE p.tenant_id = %s AND s.tenant_id = %s",
                    (tid, f"r{i}", tid, tid),
                )
    fingerprint = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM dlw.tasks t"
    with db.owner() as conn:
        before = conn.execute(fingerprint).fetchone()
    out = dba.run(
        "SELECT count(*), count(DISTINCT tenant_id) FROM dlw_admin.view_as_tenant('yankee', NULL::reporting.tasks);"
        "SELECT slug, concurrent_tasks FROM dlw_admin.view_as_tenant('zulu', NULL::reporting.quota_status);"
        "SELECT count(*) FROM dlw_admin.view_as_tenant('yankee', NULL::reporting.audit_log)"
        " WHERE actor = session_user AND action = 'support.viewed_as_tenant';"
    )
    assert out.split() == ["3|1", "zulu|5", "2"]  # the first call's audit row, and this call's own
    with db.owner() as conn:
        assert conn.execute(fingerprint).fetchone() == before
    views = [r[2] for r in audit_rows(db, "yankee", "support.viewed_as_tenant")]
    assert views == ["reporting.tasks", "reporting.audit_log"]
    assert [r[0] for r in audit_rows(db, "zulu", "support.viewed_as_tenant")] == [dba.login]


# -- deactivation -----------------------------------------------------------------------------
def seed_live_work(db: MigratedDb, slug: str) -> dict[str, Any]:
    """Tasks in every state: pending (2 pending files), running (files assigned, running and
    succeeded), succeeded, failed; a user and a service account."""
    tid = tenant_id(db, slug)
    ids: dict[str, Any] = {"tenant": tid}
    with db.owner() as conn:
        p, s = conn.execute(
            "SELECT p.id, s.id FROM dlw.projects p, dlw.storage_targets s WHERE p.tenant_id = %s AND s.tenant_id = %s",
            (tid, tid),
        ).fetchone()

        def task(name: str, files: list[str]) -> Any:
            t = conn.execute(
                "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, file_count)"
                " VALUES (%s, %s, %s, %s, 'main', %s) RETURNING id",
                (tid, p, s, f"{slug}/{name}", len(files)),
            ).fetchone()[0]
            for path in files:
                conn.execute(
                    "INSERT INTO dlw.task_files (tenant_id, task_id, path, size) VALUES (%s, %s, %s, 10)",
                    (tid, t, path),
                )
            return t

        def file_to(t: Any, path: str, *statuses: str) -> None:
            for status in statuses:
                conn.execute(
                    "UPDATE dlw.task_files SET status = %s, assignment_token = gen_random_uuid(),"
                    " lease_expires_at = now() + interval '5 min', executor_id = 'ex-1'"
                    " WHERE tenant_id = %s AND task_id = %s AND path = %s",
                    (status, tid, t, path),
                )

        ids["pending"] = task("pending", ["a", "b"])
        ids["running"] = task("running", ["a", "b", "c"])
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["running"],))
        file_to(ids["running"], "a", "assigned")
        file_to(ids["running"], "b", "assigned", "running")
        file_to(ids["running"], "c", "assigned", "succeeded")
        ids["succeeded"] = task("succeeded", ["a"])
        file_to(ids["succeeded"], "a", "assigned", "succeeded")
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["succeeded"],))
        conn.execute("UPDATE dlw.tasks SET status = 'succeeded' WHERE id = %s", (ids["succeeded"],))
        ids["failed"] = task("failed", [])
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE id = %s", (ids["failed"],))
        conn.execute("UPDATE dlw.tasks SET status = 'failed', error = 'boom' WHERE id = %s", (ids["failed"],))
        conn.execute(
            "INSERT INTO dlw.users (tenant_id, issuer, subject, email, role)"
            " VALUES (%s, 'https://idp', %s, 'u@x', 'tenant_operator')",
            (tid, f"{slug}-user"),
        )
        conn.execute(
            "INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role)"
            " VALUES (%s, 'https://idp', %s, 'tenant_operator')",
            (tid, f"{slug}-robot"),
        )
    return ids


def create_task_as_app(db: MigratedDb, tid: int) -> str:
    with psycopg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_operator", user="someone")
        return str(
            conn.execute(
                "SELECT outcome FROM dlw.create_task(NULL, NULL, 'r/new', 'main', 0,"
                ' \'[{"path": "x", "size": 1}]\')'
            ).fetchone()[0]
        )


def test_deactivation_refuses_logins_and_new_tasks_cancels_live_work_and_keeps_data_readable(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('victor', 'Victor');")
    ids = seed_live_work(db, "victor")
    tid = ids["tenant"]
    login = dba.new_login("rep_victor")
    dba.run(f"SELECT dlw_admin.create_reporting_login({lit(login)}, 'victor', 'pw-victor');")

    out = dba.run("SELECT * FROM dlw_admin.deactivate_tenant('victor', reason => 'contract ended');")
    assert out == "2|4\n"  # the pending and running tasks; 2 + 2 unfinished files
    with db.owner() as conn:
        tasks = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, status, error, finished_at IS NOT NULL FROM dlw.tasks WHERE tenant_id = %s", (tid,)
            )
        }
        assert tasks[ids["pending"]] == ("cancelled", "tenant deactivated", True)
        assert tasks[ids["running"]] == ("cancelled", "tenant deactivated", True)
        assert tasks[ids["succeeded"]] == ("succeeded", None, True)
        assert tasks[ids["failed"]] == ("failed", "boom", True)
        files = conn.execute(
            "SELECT status, count(*), bool_and(assignment_token IS NULL AND lease_expires_at IS NULL)"
            " FROM dlw.task_files WHERE tenant_id = %s GROUP BY status ORDER BY status",
            (tid,),
        ).fetchall()
        assert files == [("cancelled", 4, True), ("succeeded", 2, False)]
    rows = audit_rows(db, "victor")
    deactivated = [r for r in rows if r[1] == "tenant.deactivated"]
    assert len(deactivated) == 1 and deactivated[0][0] == dba.login
    assert deactivated[0][3] == {
        "via": "dlw_admin.deactivate_tenant",
        "reason": "contract ended",
        "was_active": True,
        "tasks_cancelled": 2,
        "files_cancelled": 4,
    }
    assert sorted(r[2] for r in rows if r[1] == "task.cancelled") == sorted([str(ids["pending"]), str(ids["running"])])

    # Logins and service tokens are refused, with the codes the API turns into 403 TENANT_INACTIVE.
    with psycopg.connect(db.app_url) as conn:
        assert conn.execute(
            "SELECT outcome FROM dlw.login_user('https://idp', 'victor-user', 'u@x', true, NULL, NULL)"
        ).fetchone() == ("TENANT_INACTIVE",)
        assert conn.execute(
            "SELECT tenant_active FROM dlw.find_service_account('https://idp', 'victor-robot')"
        ).fetchone() == (False,)
    # New tasks are refused, in SQL and over HTTP; reading still works.
    assert create_task_as_app(db, tid) == "TENANT_INACTIVE"
    with TestClient(create_app(app_settings(db))) as client:
        operator = bearer(token(tid, "tenant_operator"))
        created = client.post(
            "/api/v1/tasks",
            headers=operator,
            json={"repo_id": "victor/x", "revision": "main", "files": [{"path": "a", "size": 1}]},
        )
        assert created.status_code == 403 and created.json()["detail"]["code"] == "TENANT_INACTIVE"
        listed = client.get("/api/v1/tasks", headers=operator)
        assert listed.status_code == 200 and len(listed.json()["items"]) == 4
    # Its reporting login still reads everything, cancellations included.
    out = ok(
        db.url(login, "pw-victor"),
        "SELECT active, concurrent_tasks FROM reporting.quota_status;"
        "SELECT status, count(*), max(error) FROM reporting.tasks GROUP BY status ORDER BY status;",
    )
    assert out.split("\n")[:4] == ["f|0", "cancelled|2|tenant deactivated", "failed|1|boom", "succeeded|1|"]

    # Again: nothing more to cancel. Reactivated: tasks are admitted again.
    assert dba.run("SELECT * FROM dlw_admin.deactivate_tenant('victor');") == "0|0\n"
    dba.run("SELECT dlw_admin.reactivate_tenant('victor');")
    assert create_task_as_app(db, tid) == "created"
    assert [r[1] for r in audit_rows(db, "victor") if r[1].startswith("tenant.")][-3:] == [
        "tenant.deactivated",
        "tenant.deactivated",
        "tenant.reactivated",
    ]


def _wait_for_lock(db: MigratedDb, login: str) -> None:
    with db.owner() as conn:
        for _ in range(200):
            row = conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'", (login,)
            ).fetchone()
            if row:
                return
            time.sleep(0.02)
    raise AssertionError(f"{login} never waited for a lock")


def test_an_admission_in_flight_finishes_first_and_its_task_is_cancelled(db: MigratedDb, dba: Dba):
    """Deactivation takes the tenant's quota lock (the one dlw.create_task holds until commit)."""
    dba.run("SELECT dlw_admin.create_tenant('vlock', 'Vlock');")
    tid = tenant_id(db, "vlock")
    results: list[Any] = []
    with psycopg.connect(db.app_url) as app:
        as_tenant(app, tid, "tenant_operator", user="someone")
        outcome = app.execute(
            "SELECT outcome FROM dlw.create_task(NULL, NULL, 'r/x', 'main', 0, '[{\"path\": \"x\", \"size\": 1}]')"
        ).fetchone()
        assert outcome == ("created",)

        def deactivate() -> None:
            with psycopg.connect(dba.url, autocommit=True) as conn:
                results.append(conn.execute("SELECT * FROM dlw_admin.deactivate_tenant('vlock')").fetchone())

        worker = threading.Thread(target=deactivate)
        worker.start()
        _wait_for_lock(db, dba.login)
        app.commit()
    worker.join(10)
    assert results == [(1, 1)]
    with db.owner() as conn:
        assert conn.execute("SELECT status FROM dlw.tasks WHERE tenant_id = %s", (tid,)).fetchall() == [("cancelled",)]


def test_an_admission_that_waited_behind_a_deactivation_is_refused(db: MigratedDb, dba: Dba):
    dba.run("SELECT dlw_admin.create_tenant('vwait', 'Vwait');")
    tid = tenant_id(db, "vwait")
    results: list[str] = []
    with psycopg.connect(dba.url) as admin:
        admin.execute("SELECT * FROM dlw_admin.deactivate_tenant('vwait')")  # holds the lock until commit
        worker = threading.Thread(target=lambda: results.append(create_task_as_app(db, tid)))
        worker.start()
        _wait_for_lock(db, "dlw_app")
        admin.commit()
    worker.join(10)
    assert results == ["TENANT_INACTIVE"]


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


# -- hardening -----------------------------------------------------------------------------------
def test_snapshot_refresh_and_drift_check_are_audited_wrappers(db: MigratedDb, dba: Dba):
    out = dba.run("SELECT ran FROM dlw_admin.refresh_quota_snapshots(); SELECT count(*) FROM dlw_admin.quota_drift();")
    assert "t" in out.split()
    actions = [(actor, action) for actor, action, _, _ in audit_rows(db, "default") if action.startswith("snapshots.")]
    assert (dba.login, "snapshots.refreshed") in actions and (dba.login, "snapshots.drift_checked") in actions
    # The unaudited functions underneath are not theirs to call.
    assert dba.fails("SELECT * FROM dlw.quota_drift();") == "42501"
    assert dba.fails("SELECT * FROM dlw.refresh_quota_snapshots();") == "42501"


def test_a_stale_mapping_cannot_re_password_a_role_that_is_not_a_plain_reporting_login(db: MigratedDb, dba: Dba):
    login = dba.new_login("rep_stale")
    dba.run(f"SELECT dlw_admin.create_reporting_login('{login}', 'default', 'pw-{secrets.token_hex(4)}');")
    # Someone with superuser drops the login outside DLW and reuses the name for another role.
    db.server.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
    db.server.execute(sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS PASSWORD 'orig'").format(sql.Identifier(login)))
    assert dba.fails(f"SELECT dlw_admin.set_reporting_login_password('{login}', 'hijack');") in ("DLWA7", "42501")

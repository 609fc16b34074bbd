"""DBA administration through the real psql client, as a dlw_admin login that is no superuser:
tenants and quotas (with the exact refusal codes and the audit trail), users' role grants, and
support access to what a tenant sees (tests/support/dba.py)."""

from __future__ import annotations

from tests.support.database import MigratedDb
from tests.support.dba import Dba, audit_rows, dba, tenant_id
from tests.support.psql import psql

__all__ = ["dba"]  # the module's DBA login (tests/support/dba.py)


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

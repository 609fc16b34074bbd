"""DBA administration, the catalog side: the DBA login is no superuser, the dlw_admin functions
are pinned, commented, allowlisted definers only a DBA may call, the login manager holds
CREATEROLE and nothing else, and the snapshot wrappers are audited (tests/support/dba.py)."""

from __future__ import annotations

import psycopg
import pytest

from app.ops.catalog_check import DEFINER_ALLOWLIST, check_catalog
from tests.support.database import MigratedDb
from tests.support.dba import Dba, audit_rows, dba

__all__ = ["dba"]  # the module's DBA login (tests/support/dba.py)


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


def test_dlw_admin_is_refused_to_everyone_else(db: MigratedDb):
    """dlw_app (the API role) and a login without dlw_admin cannot call the DBA functions."""
    with psycopg.connect(db.app_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema dlw_admin"):
            conn.execute("SELECT * FROM dlw_admin.list_tenants()")


# -- hardening -----------------------------------------------------------------------------------
def test_snapshot_refresh_and_drift_check_are_audited_wrappers(db: MigratedDb, dba: Dba):
    out = dba.run("SELECT ran FROM dlw_admin.refresh_quota_snapshots(); SELECT count(*) FROM dlw_admin.quota_drift();")
    assert "t" in out.split()
    actions = [(actor, action) for actor, action, _, _ in audit_rows(db, "default") if action.startswith("snapshots.")]
    assert (dba.login, "snapshots.refreshed") in actions and (dba.login, "snapshots.drift_checked") in actions
    # The unaudited functions underneath are not theirs to call.
    assert dba.fails("SELECT * FROM dlw.quota_drift();") == "42501"
    assert dba.fails("SELECT * FROM dlw.refresh_quota_snapshots();") == "42501"

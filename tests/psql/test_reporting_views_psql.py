"""The reporting schema as a reporting login gets it: security_invoker views, every one commented,
no secret column or table behind them, no write grant, and no definer function to call but
the snapshot clock."""

from __future__ import annotations

from tests.support.catalog import REPORTING_DEFINERS, REPORTING_VIEWS
from tests.support.database import MigratedDb

# Never readable by reporting, through a view or otherwise.
SECRET_COLUMNS = {("task_files", "assignment_token"), ("storage_targets", "config"), ("usage_records", "xid")}
SECRET_TABLES = {"users", "service_accounts", "idempotency_keys", "casbin_rule", "snapshot_state", "schema_program"}


# -- the schema -------------------------------------------------------------------------------
def test_reporting_views_are_security_invoker_and_fully_commented(db: MigratedDb):
    with db.owner() as conn:
        views = conn.execute("""
            SELECT c.relname, c.reloptions, obj_description(c.oid, 'pg_class')
            FROM pg_class c WHERE c.relnamespace = 'reporting'::regnamespace ORDER BY 1""").fetchall()
        assert {v[0] for v in views} == REPORTING_VIEWS
        for name, options, comment in views:
            assert "security_invoker=true" in (options or []), name
            assert comment, f"reporting.{name} has no COMMENT"
        uncommented = conn.execute("""
            SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'reporting'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
              AND col_description(c.oid, a.attnum) IS NULL""").fetchall()
        assert uncommented == []
        # every view has tenant_id first: the column RLS filters on, and the one dashboards join on
        firsts = conn.execute("""
            SELECT DISTINCT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            WHERE c.relnamespace = 'reporting'::regnamespace AND a.attnum = 1""").fetchall()
        assert firsts == [("tenant_id",)]


def test_reporting_views_read_no_secret_column_and_grant_no_write(db: MigratedDb):
    with db.owner() as conn:
        used = conn.execute("""
            SELECT DISTINCT t.relname, a.attname,
                   has_column_privilege('dlw_reporting', t.oid, a.attnum, 'SELECT')
            FROM pg_rewrite r
            JOIN pg_class v ON v.oid = r.ev_class AND v.relnamespace = 'reporting'::regnamespace
            JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                            AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
            JOIN pg_class t ON t.oid = d.refobjid AND t.relnamespace = 'dlw'::regnamespace
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid""").fetchall()
        assert used, "the views read base columns"
        assert {(t, c) for t, c, _ in used} & SECRET_COLUMNS == set()
        assert {t for t, _, _ in used} & SECRET_TABLES == set()
        assert [(t, c) for t, c, granted in used if not granted] == [], "security_invoker needs the column grants"
        writes = conn.execute("""
            SELECT c.relname, p FROM pg_class c, unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p
            WHERE c.relnamespace = 'reporting'::regnamespace AND has_table_privilege('dlw_reporting', c.oid, p)
            """).fetchall()
        assert writes == []


def test_reporting_may_execute_no_definer_function_but_the_snapshot_clock(db: MigratedDb):
    """A SECURITY DEFINER function runs with its owner's rights (dlw_system bypasses RLS): a
    reporting login must not reach any but the one that returns a platform timestamp. (A
    REVOKE run by a role that does not own the function is only a warning, and leaves PUBLIC
    its EXECUTE.)"""
    with db.owner() as conn:
        definers = conn.execute("""
            SELECT p.oid::regprocedure::text FROM pg_proc p
            WHERE p.prosecdef AND has_function_privilege('dlw_reporting', p.oid, 'EXECUTE')""").fetchall()
    assert {d[0] for d in definers} == REPORTING_DEFINERS

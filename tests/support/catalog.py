"""Catalog questions the isolation tests ask: what may dlw_reporting read."""

from __future__ import annotations

from tests.support.database import MigratedDb

# The views of the reporting schema (sql/81_reporting_views.sql), as the isolation tests expect them.
REPORTING_VIEWS = {"tasks", "task_files", "usage_daily", "usage_monthly", "quota_status", "audit_log"}
# The only SECURITY DEFINER function a reporting login may call (it returns a platform timestamp).
REPORTING_DEFINERS = {"dlw.reporting_snapshot_refreshed_at()"}


def readable_tables(db: MigratedDb) -> list[str]:
    """Every table or view, in any schema of ours, that dlw_reporting may select from."""
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT format('%I.%I', n.nspname, c.relname)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'v', 'p', 'm')
              AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
              AND (has_table_privilege('dlw_reporting', c.oid, 'SELECT')
                   OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                              AND has_column_privilege('dlw_reporting', c.oid, a.attnum, 'SELECT')))
            ORDER BY 1""").fetchall()
    return [r[0] for r in rows]


def readable_columns(db: MigratedDb, relation: str) -> list[str]:
    with db.owner() as conn:
        rows = conn.execute(
            """
            SELECT a.attname FROM pg_attribute a
            WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
              AND has_column_privilege('dlw_reporting', a.attrelid, a.attnum, 'SELECT')
            ORDER BY a.attnum""",
            (relation,),
        ).fetchall()
    return [r[0] for r in rows]

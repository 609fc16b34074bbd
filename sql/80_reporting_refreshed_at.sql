-- owner: dlw_system
-- Reporting (see sql/81_reporting_views.sql): the one definer function the views read.
-- The fold cursor (dlw.snapshot_state) is platform data without a tenant_id, so reporting
-- logins are not granted the table; they may learn when the fold last ran, and nothing else.

CREATE OR REPLACE FUNCTION dlw.reporting_snapshot_refreshed_at() RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT s.refreshed_at FROM dlw.snapshot_state s $$;
COMMENT ON FUNCTION dlw.reporting_snapshot_refreshed_at() IS
    'When the usage fold (snapshot refresh) last ran, platform-wide (dlw.snapshot_state.refreshed_at); NULL = never. Read by reporting.quota_status.';
REVOKE ALL ON FUNCTION dlw.reporting_snapshot_refreshed_at() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.reporting_snapshot_refreshed_at() TO dlw_reporting;

-- Task admission support: the global cursor of the usage -> snapshot fold.
--
-- Quota admission (sql/30_tasks.sql) counts a tenant's bytes this UTC month as
--   quota_snapshots.amount (usage already folded)
--   + usage_records whose xid >= snapshot_state.folded_below (usage not folded yet).
-- The snapshot refresher (dlw_system) advances folded_below and adds the folded rows to
-- quota_snapshots in the same transaction, so a reader always sees the two consistently.
-- Not tenant data (no tenant_id): one row for the whole platform, no row-level security.

SET ROLE dlw_owner;

CREATE TABLE dlw.snapshot_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    folded_below  xid8 NOT NULL DEFAULT '0',
    refreshed_at  timestamptz
);
COMMENT ON TABLE dlw.snapshot_state IS
    'Singleton cursor of the usage fold: usage_records with xid < folded_below are included in quota_snapshots.amount; the rest are not yet';
COMMENT ON COLUMN dlw.snapshot_state.singleton IS 'Always true: the table holds exactly one row';
COMMENT ON COLUMN dlw.snapshot_state.folded_below IS
    'Every usage_records row with xid below this value is folded into quota_snapshots (advanced only to pg_snapshot_xmin of the refresher''s snapshot)';
COMMENT ON COLUMN dlw.snapshot_state.refreshed_at IS 'When the snapshot refresher last advanced the cursor; NULL = never ran';

INSERT INTO dlw.snapshot_state DEFAULT VALUES;

REVOKE ALL ON dlw.snapshot_state FROM PUBLIC;
GRANT SELECT ON dlw.snapshot_state TO dlw_app;
GRANT SELECT, UPDATE ON dlw.snapshot_state TO dlw_system;

RESET ROLE;

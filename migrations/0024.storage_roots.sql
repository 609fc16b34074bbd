-- Storage targets decide where files go (issue 15): a target's config may name a root directory
-- and a layout (sql/19_storage_roots.sql validates them). No two tenants' roots may be the same
-- directory or one inside the other: every root is registered here, across tenants, by a
-- definer function under one transaction advisory lock (race-free). The table holds tenant
-- rows, so it has RLS forced like every tenant table: dlw_app reads its own tenant's rows only
-- and writes none; dlw_system's definer code (which bypasses RLS) is the only writer.

SET ROLE dlw_owner;

CREATE TABLE dlw.storage_roots (
    tenant_id  bigint NOT NULL,
    target_id  uuid NOT NULL,
    root       text NOT NULL CONSTRAINT storage_roots_root_absolute CHECK (root ~ '^(/[^/]+)+$'),
    PRIMARY KEY (tenant_id, target_id),
    FOREIGN KEY (tenant_id, target_id) REFERENCES dlw.storage_targets (tenant_id, id) ON DELETE CASCADE
);
COMMENT ON TABLE dlw.storage_roots IS
    'Every storage target root, across tenants: what dlw.storage_root_sync checks a new or changed root against (no two tenants'' roots equal or nested). Written only by that definer function; dlw_app reads its own tenant''s rows, reporting nothing';
COMMENT ON COLUMN dlw.storage_roots.root IS 'The target''s config->>''root'' (normalized: absolute, no trailing slash, no . or .. segments)';

ALTER TABLE dlw.storage_roots ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
REVOKE ALL ON dlw.storage_roots FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dlw.storage_roots TO dlw_system;
GRANT SELECT ON dlw.storage_roots TO dlw_app;  -- its own tenant's rows only (sql/10_policies.sql)

RESET ROLE;

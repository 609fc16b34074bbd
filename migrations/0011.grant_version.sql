-- The grant version: a platform-wide counter of changes to dlw.casbin_rule.
--
-- The statement trigger on dlw.casbin_rule (sql/70_administration.sql) bumps it in the
-- changing transaction and then NOTIFYs dlw_casbin_rule with an empty payload. Any role that
-- can connect may send a notification on that channel too (NOTIFY has no privilege), so an API
-- instance does not trust the notification: it reads this counter and reloads its policy only
-- when the counter moved (docs/authorization.md, "How reload works").
-- Not tenant data (no tenant_id): one row for the whole platform, no row-level security.

SET ROLE dlw_owner;

CREATE TABLE dlw.grant_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE dlw.grant_version IS
    'Singleton counter of dlw.casbin_rule changes, bumped by its statement trigger in the same transaction; API instances reload their policy only when it moved';
COMMENT ON COLUMN dlw.grant_version.singleton IS 'Always true: the table holds exactly one row';
COMMENT ON COLUMN dlw.grant_version.version IS
    'Incremented once per statement that changes dlw.casbin_rule (INSERT, UPDATE, DELETE, TRUNCATE)';

INSERT INTO dlw.grant_version DEFAULT VALUES;

-- Read by the API; bumped by whoever changes dlw.casbin_rule: dlw_system (the dlw_admin
-- functions), the owner or a superuser. Nobody deletes the row; without it a change fails.
REVOKE ALL ON dlw.grant_version FROM PUBLIC;
GRANT SELECT ON dlw.grant_version TO dlw_app;
GRANT SELECT, UPDATE (version) ON dlw.grant_version TO dlw_system;

RESET ROLE;

-- Costs that stay flat as tenants and history grow (issue 16).
--
-- 1. The executor queue summary, dlw.executor_queue: per tenant, how many files are pending and
--    how many are in flight (assigned or running), so that the fair claim ranks tenants from one
--    small row each instead of counting task_files. Rows of two kinds:
--      folded = true   the tenant's summary (at most one row per tenant);
--      folded = false  a change not folded yet, appended by the statement triggers on
--                      dlw.task_files (sql/39_executor_queue.sql): insert-only, so a writer never
--                      waits for another writer's summary row (two claims never wait, a task
--                      creation never waits for a claim).
--    The claim (and the snapshot refresher) folds the changes into the summary rows.
-- 2. The expiry sweep finds expired leases across tenants through an index on the expiry.
-- 3. Filtered lists: tasks by status, audit rows by action, each index led by tenant_id.

SET ROLE dlw_owner;

CREATE FUNCTION dlw.cross_tenant_key(p_value timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
CREATE FUNCTION dlw.cross_tenant_key(p_value bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
REVOKE ALL ON FUNCTION dlw.cross_tenant_key(timestamptz), dlw.cross_tenant_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(timestamptz) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(bigint) TO dlw_system;

CREATE INDEX task_files_lease_expiry ON dlw.task_files (dlw.cross_tenant_key(lease_expires_at))
    WHERE status IN ('assigned', 'running');
COMMENT ON INDEX dlw.task_files_lease_expiry IS
    'Leases in flight by expiry across tenants, for the expiry sweep of a system-wide claim (dlw_system): it reads only the expired ones. On dlw.cross_tenant_key, which is not leakproof, so never used under RLS';

CREATE TABLE dlw.executor_queue (
    tenant_id  bigint NOT NULL,
    folded     boolean NOT NULL DEFAULT false,
    pending    bigint NOT NULL,
    in_flight  bigint NOT NULL,
    served_at  timestamptz
);
COMMENT ON TABLE dlw.executor_queue IS
    'Executor queue summary per tenant: folded rows hold a tenant''s pending and in-flight file counts; unfolded rows are changes appended by the task_files triggers, folded by dlw.executor_queue_fold()';
COMMENT ON COLUMN dlw.executor_queue.folded IS
    'true: the tenant''s summary row (one per tenant); false: a change (deltas) not folded into it yet';
COMMENT ON COLUMN dlw.executor_queue.pending IS 'Files pending (a change: the difference)';
COMMENT ON COLUMN dlw.executor_queue.in_flight IS 'Files assigned or running (a change: the difference)';
COMMENT ON COLUMN dlw.executor_queue.served_at IS
    'When a claim last gave the tenant a file: among tenants with as many files in flight, the one served least recently goes first';

CREATE UNIQUE INDEX executor_queue_summary ON dlw.executor_queue (tenant_id) WHERE folded;
CREATE INDEX executor_queue_changes ON dlw.executor_queue (tenant_id) WHERE NOT folded;
-- Every key on dlw.cross_tenant_key (not leakproof): dlw_app may read its own summary row, and a
-- condition on in_flight must never probe this index ahead of the policy.
CREATE INDEX executor_queue_rank ON dlw.executor_queue
    (dlw.cross_tenant_key(in_flight), dlw.cross_tenant_key(served_at) NULLS FIRST, dlw.cross_tenant_key(tenant_id))
    WHERE folded AND pending > 0;
COMMENT ON INDEX dlw.executor_queue_summary IS 'One summary row per tenant';
COMMENT ON INDEX dlw.executor_queue_changes IS 'The changes not folded yet (the fold reads only these)';
COMMENT ON INDEX dlw.executor_queue_rank IS
    'Tenants with pending files, fewest in flight first: the fair claim (dlw_system) reads as many entries as it returns files. Not led by tenant_id: only dlw_system reads across tenants; on dlw.cross_tenant_key, never used under RLS';

ALTER TABLE dlw.executor_queue ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
-- A tenant may read its own figures (policy in sql/10_policies.sql); nobody writes through RLS
-- (the definer trigger and the functions of dlw_system do).
REVOKE ALL ON dlw.executor_queue FROM PUBLIC;
GRANT SELECT ON dlw.executor_queue TO dlw_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON dlw.executor_queue TO dlw_system;

-- Existing files: the summary as of now.
INSERT INTO dlw.executor_queue (tenant_id, folded, pending, in_flight)
SELECT f.tenant_id, true, count(*) FILTER (WHERE f.status = 'pending'),
       count(*) FILTER (WHERE f.status IN ('assigned', 'running'))
  FROM dlw.task_files f
 WHERE f.status IN ('pending', 'assigned', 'running')
 GROUP BY f.tenant_id;

-- The usage fold rewrites one quota_snapshots row per (tenant, month) it touched; with room left
-- on each page those updates stay HOT (no new index entry; amount and refreshed_at are not
-- indexed), which halves the per-tenant cost of a fold touching 10,000 tenants.
ALTER TABLE dlw.quota_snapshots SET (fillfactor = 50);

-- Filtered first pages: GET /tasks?status=... and GET /audit?action=..., newest first.
CREATE INDEX tasks_tenant_status_created ON dlw.tasks (tenant_id, status, created_at DESC, id DESC);
COMMENT ON INDEX dlw.tasks_tenant_status_created IS 'GET /api/v1/tasks?status=...: a tenant''s tasks in one status, newest first';
CREATE INDEX audit_log_tenant_action_at ON dlw.audit_log (tenant_id, action, at DESC, id DESC);
COMMENT ON INDEX dlw.audit_log_tenant_action_at IS 'GET /api/v1/audit?action=...: a tenant''s audit rows of one action, newest first';

RESET ROLE;

-- 4. Grant changes, per rule: an API instance that knows version v applies the rules changed in
--    v+1 .. the current version instead of reloading every row (app/authz/authorizer.py). The
--    casbin_rule triggers (sql/70_administration.sql) append the changed rules with the version
--    their statement bumped to, and keep the last versions only: changes_from is the oldest
--    version whose changes are all here (an instance further behind reloads everything).
SET ROLE dlw_owner;

CREATE TABLE dlw.casbin_rule_changes (
    version  bigint NOT NULL,
    ptype    text NOT NULL,
    v0       text NOT NULL,
    v1       text NOT NULL,
    v2       text NOT NULL,
    v3       text NOT NULL,
    v4       text NOT NULL,
    v5       text NOT NULL
);
CREATE INDEX casbin_rule_changes_version ON dlw.casbin_rule_changes (version);
COMMENT ON TABLE dlw.casbin_rule_changes IS
    'The dlw.casbin_rule rules (inserted, deleted or updated, old and new) each grant version changed, for the incremental policy reload of API instances; recent versions only (see dlw.grant_version.changes_from). Platform data, not tenant data';
COMMENT ON COLUMN dlw.casbin_rule_changes.version IS 'The dlw.grant_version the changing statement bumped to';
COMMENT ON COLUMN dlw.casbin_rule_changes.ptype IS 'The changed rule, as in dlw.casbin_rule (ptype, v0..v5)';
COMMENT ON COLUMN dlw.casbin_rule_changes.v0 IS 'The changed rule''s v0';
COMMENT ON COLUMN dlw.casbin_rule_changes.v1 IS 'The changed rule''s v1';
COMMENT ON COLUMN dlw.casbin_rule_changes.v2 IS 'The changed rule''s v2';
COMMENT ON COLUMN dlw.casbin_rule_changes.v3 IS 'The changed rule''s v3';
COMMENT ON COLUMN dlw.casbin_rule_changes.v4 IS 'The changed rule''s v4';
COMMENT ON COLUMN dlw.casbin_rule_changes.v5 IS 'The changed rule''s v5';

ALTER TABLE dlw.grant_version ADD COLUMN changes_from bigint NOT NULL DEFAULT 1;
COMMENT ON COLUMN dlw.grant_version.changes_from IS
    'Oldest version whose changed rules are all in dlw.casbin_rule_changes: an instance at version v may catch up incrementally only when v + 1 >= changes_from';
UPDATE dlw.grant_version SET changes_from = version + 1;  -- earlier changes were not recorded

REVOKE ALL ON dlw.casbin_rule_changes FROM PUBLIC;
GRANT SELECT ON dlw.casbin_rule_changes TO dlw_app;
GRANT SELECT, INSERT, DELETE ON dlw.casbin_rule_changes TO dlw_system;
GRANT UPDATE (changes_from) ON dlw.grant_version TO dlw_system;

RESET ROLE;

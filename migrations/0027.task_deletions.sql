-- Deleting what a task downloaded (issue 15): DELETE /api/v1/tasks/{id} on a terminal task marks
-- it (tasks.deletion) and queues one deletion work item (dlw.task_deletions), which executors
-- claim under a lease like files, carry out on disk and report (sql/44_executor_deletions.sql).
-- The rows are written only by dlw_system's definer functions: dlw_app reads its own tenant's
-- rows and writes none (a tenant cannot mark a deletion done without an executor doing it).

SET ROLE dlw_owner;

ALTER TABLE dlw.tasks
    ADD COLUMN deletion text CONSTRAINT tasks_deletion CHECK (deletion IN ('deleting', 'deleted', 'failed')),
    ADD COLUMN deleted_at timestamptz;
COMMENT ON COLUMN dlw.tasks.deletion IS
    'NULL: the task''s files are kept; deleting: a deletion is queued or running; deleted: an executor removed its files and the storage they alone used is released; failed: the deletion failed (DELETE again to retry it). Written only by dlw_system (trigger tasks_deletion_guard)';
COMMENT ON COLUMN dlw.tasks.deleted_at IS 'When the deletion completed';

CREATE TABLE dlw.task_deletions (
    tenant_id         bigint NOT NULL,
    id                uuid NOT NULL DEFAULT dlw.new_id(),
    task_id           uuid NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CONSTRAINT task_deletions_status CHECK (status IN ('pending', 'assigned', 'done', 'failed')),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    assignment_token  uuid,
    lease_seconds     integer CHECK (lease_seconds > 0),
    lease_expires_at  timestamptz,
    executor_id       text,
    not_before        timestamptz,
    error             text,
    plan              jsonb,
    released          jsonb,
    released_bytes    bigint CHECK (released_bytes >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, task_id),
    FOREIGN KEY (tenant_id, task_id) REFERENCES dlw.tasks (tenant_id, id) ON DELETE CASCADE
);
COMMENT ON TABLE dlw.task_deletions IS
    'One deletion of a task''s files, the work item executors claim under a lease (dlw.executor_claim_deletions) and report (done or failed). Written only by dlw_system''s definer functions; dlw_app reads its own tenant''s rows';
COMMENT ON COLUMN dlw.task_deletions.status IS 'pending -> assigned -> done | failed; assigned -> pending (lease expired, retryable failure); failed -> pending (DELETE again)';
COMMENT ON COLUMN dlw.task_deletions.attempts IS 'How many times it was claimed; an expired lease or retryable failure requeues it only while attempts < the retry limit';
COMMENT ON COLUMN dlw.task_deletions.assignment_token IS 'Secret of the executor holding the lease; never granted to reporting';
COMMENT ON COLUMN dlw.task_deletions.lease_seconds IS 'Length of the current lease (heartbeats extend it by this much)';
COMMENT ON COLUMN dlw.task_deletions.lease_expires_at IS 'An assigned deletion whose lease expired returns to the queue';
COMMENT ON COLUMN dlw.task_deletions.executor_id IS 'Executor holding (or that last held) the lease: <token subject>/<instance label>';
COMMENT ON COLUMN dlw.task_deletions.not_before IS 'Earliest time a claim offers it again after a retryable failure (dlw.retry_backoff); NULL: at once';
COMMENT ON COLUMN dlw.task_deletions.error IS 'The last failure reported (or why the lease ended)';
COMMENT ON COLUMN dlw.task_deletions.plan IS 'What the executor was told to remove, decided by dlw.task_deletion_plan when it was claimed';
COMMENT ON COLUMN dlw.task_deletions.released IS 'Storage released by the completion: [{storage_target_id, sha256, bytes}] (dlw.task_deletion_released)';
COMMENT ON COLUMN dlw.task_deletions.released_bytes IS 'Sum of released[].bytes';

-- Pending work of one tenant, oldest first (a tenant-limited executor's claim).
CREATE INDEX task_deletions_queue ON dlw.task_deletions (tenant_id, created_at) WHERE status = 'pending';
COMMENT ON INDEX dlw.task_deletions_queue IS 'A tenant''s pending deletions, oldest first';
-- Leases in flight of one tenant: the scoped expiry sweep, and the download claim's check that
-- no deletion of the same repository in the same target is being carried out.
CREATE INDEX task_deletions_in_flight ON dlw.task_deletions (tenant_id, lease_expires_at) WHERE status = 'assigned';
COMMENT ON INDEX dlw.task_deletions_in_flight IS 'A tenant''s deletions in flight by lease expiry';
-- Across tenants, for the definer functions of dlw_system only (never used under RLS:
-- dlw.cross_tenant_key is not leakproof).
CREATE INDEX task_deletions_pending_cross_tenant ON dlw.task_deletions (dlw.cross_tenant_key(created_at))
    WHERE status = 'pending';
COMMENT ON INDEX dlw.task_deletions_pending_cross_tenant IS
    'Pending deletions across tenants, oldest first, for a system-wide claim (dlw_system); on dlw.cross_tenant_key, never used under RLS';
CREATE INDEX task_deletions_lease_expiry ON dlw.task_deletions (dlw.cross_tenant_key(lease_expires_at))
    WHERE status = 'assigned';
COMMENT ON INDEX dlw.task_deletions_lease_expiry IS
    'Deletion leases by expiry across tenants, for the expiry sweep of a system-wide claim (dlw_system); on dlw.cross_tenant_key, never used under RLS';
CREATE INDEX task_deletions_id_cross_tenant ON dlw.task_deletions (dlw.cross_tenant_key(id));
COMMENT ON INDEX dlw.task_deletions_id_cross_tenant IS
    'A deletion by id across tenants, for the executor reports (dlw_system); on dlw.cross_tenant_key, never used under RLS';

ALTER TABLE dlw.task_deletions ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
REVOKE ALL ON dlw.task_deletions FROM PUBLIC;
GRANT SELECT ON dlw.task_deletions TO dlw_app;  -- its own tenant's rows (sql/10_policies.sql)
GRANT SELECT, INSERT, UPDATE, DELETE ON dlw.task_deletions TO dlw_system;
GRANT SELECT (tenant_id, id, task_id, status, attempts, lease_expires_at, executor_id, not_before, error,
              released, released_bytes, created_at, updated_at, finished_at)
    ON dlw.task_deletions TO dlw_reporting;

RESET ROLE;

-- What a deletion keeps (dlw.task_deletion_plan, dlw.task_deletion_released): another task of
-- the same target holding the same path or the same content. Both probes stay within the tenant.
SET ROLE dlw_owner;
CREATE INDEX tasks_tenant_target_repo ON dlw.tasks (tenant_id, storage_target_id, repo_id);
COMMENT ON INDEX dlw.tasks_tenant_target_repo IS
    'A tenant''s tasks of one repository in one storage target: who else holds a path a deletion would remove';
CREATE INDEX task_files_tenant_sha256 ON dlw.task_files (tenant_id, sha256) WHERE sha256 IS NOT NULL;
COMMENT ON INDEX dlw.task_files_tenant_sha256 IS
    'A tenant''s files by content: who else holds a blob a deletion would remove or release';
RESET ROLE;

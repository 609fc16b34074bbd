-- owner: dlw_system
-- Deleting a task's files (issue 15; docs/storage.md "Deleting"): the API's request and the
-- executors' claim and reports. SECURITY DEFINER, owned by dlw_system, search_path pinned,
-- EXECUTE for dlw_app only, on app/ops/catalog_check.py's allowlist. The rules (who holds a
-- file, what is released) are in sql/34_task_deletion_rules.sql.
--
-- Isolation by construction: dlw.delete_task acts only on the context's tenant (every statement
-- is led by tenant_id = dlw.ctx_tenant_id()); the executor functions take the executor's scope
-- from its context (dlw.executor_scope(): its tenant, or every tenant for tid 0) exactly as the
-- file claim does, so a tenant-limited executor never sees, changes or learns of another
-- tenant's deletion (it reads as NOT_FOUND). dlw_app has no write grant on dlw.task_deletions.
--
-- Leases: the one mechanism of files and deletions (sql/38_work_leases.sql, kind deletion): a
-- claim gives a fresh assignment_token and lease; only that token, while the lease runs, may
-- heartbeat, complete or fail the deletion (dlw.lease_lock_deletion); every deletion claim first
-- returns expired leases of its scope to the queue or fails the deletion, out of attempts
-- (dlw.lease_claim_check, dlw.lease_sweep_deletion); a failure backs off (dlw.lease_fail_deletion).
-- Lock order: the task before its deletion row (the request and the reports lock the task first
-- and wait; the claim and the sweep hold deletion rows before they know the task: SKIP LOCKED,
-- never a wait).

-- ---------------------------------------------------------------------------------------
-- Internal helpers (invoker rights, owned by dlw_system, EXECUTE for nobody else)
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.deletion_fail_final(p_tenant_id bigint, p_deletion_id uuid, p_error text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task uuid;
BEGIN
    -- The caller holds the task row, then the deletion row.
    UPDATE dlw.task_deletions d
       SET status = 'failed', error = left(p_error, 2000), assignment_token = NULL, lease_expires_at = NULL,
           lease_seconds = NULL, updated_at = now(), finished_at = now()
     WHERE d.tenant_id = p_tenant_id AND d.id = p_deletion_id
    RETURNING d.task_id INTO v_task;
    UPDATE dlw.tasks x SET deletion = 'failed' WHERE x.tenant_id = p_tenant_id AND x.id = v_task;
    PERFORM dlw.audit_append(p_tenant_id, coalesce(dlw.ctx_user_id(), 'dlw:executor-queue'), 'task.deletion_failed',
        v_task::text, jsonb_build_object('deletion_id', p_deletion_id, 'error', p_error));
    RETURN 'failed';
END
$$;
COMMENT ON FUNCTION dlw.deletion_fail_final(bigint, uuid, text) IS
    'Internal (caller holds the task row, then the deletion row): the deletion fails (its lease ends) and so does the task''s deletion marker (tasks.deletion = failed; DELETE again requeues it), with a task.deletion_failed audit row. Returns failed.';

-- The sweep and the locked lookup are the shared ones now (dlw.lease_sweep_deletion, dlw.lease_lock_deletion).
DROP FUNCTION IF EXISTS dlw.deletion_sweep_expired(bigint, integer, integer);
DROP FUNCTION IF EXISTS dlw.executor_locked_deletion(uuid, uuid);

-- The shared sweep and failure report call it for a deletion, as dlw_system (its owner).
REVOKE ALL ON FUNCTION dlw.deletion_fail_final(bigint, uuid, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------
-- The API's request: DELETE /api/v1/tasks/{id}
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.delete_task(p_task_id uuid, OUT outcome text, OUT deletion text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant bigint := dlw.ctx_tenant_id();
    v_status text;
    v_marker text;
BEGIN
    IF v_tenant IS NULL OR NOT coalesce(dlw.ctx_role() = ANY ('{tenant_admin,tenant_operator,system_admin}'::text[]), false) THEN
        RAISE EXCEPTION 'dlw.delete_task: needs a tenant context of a role that may write tasks, not %',
            coalesce(dlw.ctx_role(), 'NULL') USING ERRCODE = '42501';
    END IF;
    SELECT x.status, x.deletion INTO v_status, v_marker
      FROM dlw.tasks x
     WHERE x.tenant_id = v_tenant AND x.id = p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'NOT_FOUND';
        RETURN;
    END IF;
    IF v_status IN ('pending', 'running') THEN
        outcome := 'TASK_LIVE';
        deletion := v_marker;
        RETURN;
    END IF;
    IF v_marker IN ('deleting', 'deleted') THEN  -- asked again: nothing to do, not an error
        outcome := 'unchanged';
        deletion := v_marker;
        RETURN;
    END IF;
    -- A new work item; a failed deletion's (any earlier row of the task) is queued again with
    -- fresh attempts. The task row is locked, so no other request races this one.
    INSERT INTO dlw.task_deletions AS d (tenant_id, task_id) VALUES (v_tenant, p_task_id)
    ON CONFLICT (tenant_id, task_id) DO UPDATE
       SET status = 'pending', attempts = 0, error = NULL, not_before = NULL, assignment_token = NULL,
           lease_expires_at = NULL, lease_seconds = NULL, executor_id = NULL, plan = NULL, released = NULL,
           released_bytes = NULL, created_at = now(), updated_at = now(), finished_at = NULL;
    UPDATE dlw.tasks x SET deletion = 'deleting' WHERE x.tenant_id = v_tenant AND x.id = p_task_id;
    PERFORM dlw.audit_append(v_tenant, dlw.ctx_user_id(), 'task.deletion_requested', p_task_id::text,
        jsonb_build_object('status', v_status, 'again', v_marker IS NOT NULL));
    outcome := 'requested';
    deletion := 'deleting';
END
$$;
COMMENT ON FUNCTION dlw.delete_task(uuid) IS
$c$Asks for the deletion of a finished task's files (DELETE /api/v1/tasks/{id}), in the context's tenant only: the task is marked deleting and one deletion work item is queued for the executors (dlw.executor_claim_deletions), with a task.deletion_requested audit row; a failed deletion is queued again with fresh attempts. Needs a context of tenant_admin, tenant_operator or system_admin (42501 otherwise).
Returns (outcome, deletion): requested | unchanged (already deleting or deleted: nothing changes) | TASK_LIVE (the task is pending or running: cancel it first) | NOT_FOUND (also another tenant's id).$c$;

-- ---------------------------------------------------------------------------------------
-- The executors: claim, heartbeat, complete, fail
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.executor_claim_deletions(
    p_max integer, p_lease_seconds integer, p_executor text DEFAULT NULL,
    p_max_attempts integer DEFAULT 5  -- dlw.domain_facts().default_max_attempts
)
RETURNS TABLE (
    deletion_id uuid, task_id uuid, tenant_id bigint, tenant_slug text, attempts integer,
    assignment_token uuid, lease_seconds integer, lease_expires_at timestamptz, plan jsonb
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope    bigint;
    v_now      timestamptz;
    v_executor text;
BEGIN
    -- The shared claim prologue (sql/38_work_leases.sql): scope (42501 first), limits (22023),
    -- then the expiry sweep of the deletion leases in this scope.
    SELECT c.scope, c.executor INTO v_scope, v_executor
      FROM dlw.lease_claim_check('dlw.executor_claim_deletions', 'max', p_max, p_lease_seconds, p_max_attempts,
                                 p_executor) c;
    PERFORM dlw.lease_sweep_deletion(v_scope, p_max_attempts, 100);
    v_now := clock_timestamp();

    -- A system-wide executor: fair across tenants, as the file claim is. A deletion's turn is
    -- its tenant's deletions in flight + its rank among the tenant's pending ones (oldest
    -- first), so a tenant that asked for thousands of deletions delays nobody else's: the
    -- tenant with the fewest in flight goes first, ties to the older request. The tenants
    -- with pending deletions are found by a loose scan of task_deletions_queue (one probe
    -- each), so the cost follows those tenants and the deletions returned, not the deletions
    -- waiting. The turns give each tenant a share; each share is then locked among the
    -- tenant's oldest with SKIP LOCKED (as the file claim does), so a concurrent claim takes
    -- the next ones instead of skipping the same rows and returning fewer. A tenant-limited
    -- executor's share is all p_max of its own tenant, its oldest. Never a wait. The plan is decided now, from the
    -- files other tasks hold at this moment (sql/34_task_deletion_rules.sql).
    RETURN QUERY
    WITH RECURSIVE waiting(tenant_id) AS (
        SELECT (SELECT min(d.tenant_id) FROM dlw.task_deletions d WHERE d.status = 'pending')
         WHERE v_scope IS NULL
        UNION ALL
        SELECT (SELECT min(d.tenant_id) FROM dlw.task_deletions d
                 WHERE d.status = 'pending' AND d.tenant_id > w.tenant_id)
          FROM waiting w
         WHERE w.tenant_id IS NOT NULL
    ), turns AS (
        SELECT w.tenant_id, e.created_at, e.id, f.in_flight + e.rank AS turn
          FROM waiting w
         CROSS JOIN LATERAL (SELECT count(*) AS in_flight FROM dlw.task_deletions a
                              WHERE a.tenant_id = w.tenant_id AND a.status = 'assigned') f
         CROSS JOIN LATERAL (
               SELECT d.id, d.created_at, row_number() OVER (ORDER BY d.created_at, d.id) AS rank
                 FROM dlw.task_deletions d
                WHERE d.tenant_id = w.tenant_id AND d.status = 'pending'
                  AND (d.not_before IS NULL OR d.not_before <= v_now)
                ORDER BY d.created_at, d.id
                LIMIT p_max) e
         WHERE w.tenant_id IS NOT NULL
    ), shares AS (
        SELECT c.tenant_id, count(*) AS n
          FROM (SELECT t.tenant_id FROM turns t ORDER BY t.turn, t.created_at, t.id LIMIT p_max) c
         GROUP BY c.tenant_id
        UNION ALL
        SELECT v_scope, p_max WHERE v_scope IS NOT NULL
    ), picked AS (
        SELECT l.tenant_id, l.id
          FROM shares s
         CROSS JOIN LATERAL (
               SELECT d.tenant_id, d.id
                 FROM dlw.task_deletions d
                WHERE d.tenant_id = s.tenant_id AND d.status = 'pending'
                  AND (d.not_before IS NULL OR d.not_before <= v_now)
                ORDER BY d.created_at, d.id
                LIMIT s.n
                  FOR UPDATE SKIP LOCKED) l
    ), assigned AS (
        UPDATE dlw.task_deletions d
           SET status = 'assigned', assignment_token = gen_random_uuid(), lease_seconds = p_lease_seconds,
               lease_expires_at = v_now + make_interval(secs => p_lease_seconds), attempts = d.attempts + 1,
               executor_id = v_executor, error = NULL, not_before = NULL, updated_at = now(),
               plan = dlw.task_deletion_plan(d.tenant_id, d.task_id)
          FROM picked p
         WHERE d.tenant_id = p.tenant_id AND d.id = p.id
        RETURNING d.id, d.task_id, d.tenant_id, d.attempts, d.assignment_token, d.lease_seconds, d.lease_expires_at,
                  d.plan, d.created_at
    )
    SELECT a.id, a.task_id, a.tenant_id, t.slug, a.attempts, a.assignment_token, a.lease_seconds,
           a.lease_expires_at, a.plan
      FROM assigned a
      JOIN dlw.tenants t ON t.tenant_id = a.tenant_id
     ORDER BY a.created_at, a.id;
END
$$;
COMMENT ON FUNCTION dlw.executor_claim_deletions(integer, integer, text, integer) IS
$c$Claims up to p_max task deletions for the acting executor (context role executor; its tenant, or every tenant for tenant 0) under a lease of p_lease_seconds, after returning expired deletion leases of its scope to the queue (out of p_max_attempts: the deletion fails). Fair across tenants for a system-wide executor (the tenant with the fewest deletions in flight first, then the older request, so one tenant's many deletions delay no other's); oldest first within a tenant and for a tenant-limited executor. Rows locked FOR UPDATE SKIP LOCKED: concurrent claims get disjoint deletions and never wait. Each gets a fresh assignment_token, attempts + 1, status assigned, and its plan (dlw.task_deletion_plan: the storage root and layout, and per file what to remove).
While a deletion is assigned, the file claim (dlw.executor_claim) offers no file of another task of the same repository in the same target: nothing is written where it removes.
Raises 42501 without an executor context; 22023 for p_max outside 1..claim_max_files, lease_seconds outside lease_seconds_min..lease_seconds_max, p_max_attempts < 1.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_deletion_heartbeat(p_deletion_id uuid, p_assignment_token uuid)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM dlw.lease_lock_deletion(p_deletion_id, p_assignment_token, true);
    IF v.refusal IS NOT NULL THEN
        RETURN QUERY SELECT v.refusal, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE dlw.task_deletions d
       SET lease_expires_at = clock_timestamp() + make_interval(secs => d.lease_seconds), updated_at = now()
     WHERE d.tenant_id = v.tenant_id AND d.id = p_deletion_id
    RETURNING 'ok'::text, d.lease_expires_at;
END
$$;
COMMENT ON FUNCTION dlw.executor_deletion_heartbeat(uuid, uuid) IS
    'The holder of a live deletion lease extends it by its lease_seconds from now. Returns (outcome, lease_expires_at): ok | LEASE_LOST | NOT_FOUND (no such deletion in the executor''s scope). Raises 42501 without an executor context.';

CREATE OR REPLACE FUNCTION dlw.executor_deletion_complete(p_deletion_id uuid, p_assignment_token uuid)
RETURNS TABLE (outcome text, released_bytes bigint, released jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v        record;
    v_rows   jsonb;
    v_bytes  bigint;
BEGIN
    SELECT * INTO v FROM dlw.lease_lock_deletion(p_deletion_id, p_assignment_token, true);
    IF v.status = 'done' AND p_assignment_token IS NOT NULL AND v.assignment_token = p_assignment_token THEN
        -- The same report again (its answer was lost): the same answer, released once.
        RETURN QUERY SELECT 'already_deleted'::text, d.released_bytes, d.released
                       FROM dlw.task_deletions d WHERE d.tenant_id = v.tenant_id AND d.id = p_deletion_id;
        RETURN;
    END IF;
    IF v.refusal IS NOT NULL THEN
        RETURN QUERY SELECT v.refusal, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    -- What this deletion frees, decided and released in one place (sql/34_task_deletion_rules.sql).
    SELECT coalesce(jsonb_agg(jsonb_build_object('storage_target_id', r.storage_target_id, 'sha256', r.sha256,
                                                 'bytes', r.bytes) ORDER BY r.sha256), '[]'::jsonb),
           coalesce(sum(r.bytes), 0)::bigint
      INTO v_rows, v_bytes
      FROM dlw.task_deletion_released(v.tenant_id, p_deletion_id) r;
    -- That call also released these rows from storage accounting (dlw.storage_release), here, in
    -- this transaction (docs/storage.md, "Deleting").
    UPDATE dlw.task_deletions d
       SET status = 'done', lease_expires_at = NULL, error = NULL, released = v_rows, released_bytes = v_bytes,
           updated_at = now(), finished_at = now()
     WHERE d.tenant_id = v.tenant_id AND d.id = p_deletion_id;
    UPDATE dlw.tasks x SET deletion = 'deleted', deleted_at = now() WHERE x.tenant_id = v.tenant_id AND x.id = v.task_id;
    PERFORM dlw.audit_append(v.tenant_id, dlw.ctx_user_id(), 'task.deleted', v.task_id::text,
        jsonb_build_object('deletion_id', p_deletion_id, 'released_bytes', v_bytes,
                           'released_blobs', jsonb_array_length(v_rows)));
    RETURN QUERY SELECT 'deleted'::text, v_bytes, v_rows;
END
$$;
COMMENT ON FUNCTION dlw.executor_deletion_complete(uuid, uuid) IS
$c$The holder of a live deletion lease reports the task's files removed as its plan said. In one transaction: the storage freed is computed (dlw.task_deletion_released) and recorded on the deletion (released, released_bytes), the deletion is done, the task is marked deleted (deleted_at), with a task.deleted audit row.
Returns (outcome, released_bytes, released): deleted | already_deleted (the same token reported it before: the same answer) | LEASE_LOST (wrong or stale token, expired lease, not assigned; nothing changes) | NOT_FOUND (no such deletion in the executor's scope). Raises 42501 without an executor context.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_deletion_fail(
    p_deletion_id uuid, p_assignment_token uuid, p_error text, p_retryable boolean,
    p_max_attempts integer DEFAULT 5  -- dlw.domain_facts().default_max_attempts
)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The shared failure report (sql/38_work_leases.sql): the task and the deletion locked,
    -- backoff (dlw.retry_backoff) or the final failure (dlw.deletion_fail_final).
    RETURN (SELECT l.outcome
              FROM dlw.lease_fail_deletion(p_deletion_id, p_assignment_token, p_error, p_retryable,
                                           p_max_attempts) l);
END
$$;
COMMENT ON FUNCTION dlw.executor_deletion_fail(uuid, uuid, text, boolean, integer) IS
    'The holder of a live deletion lease reports a failure. Retryable while attempts < p_max_attempts: back to the queue, offered again after dlw.retry_backoff(attempts) (an executor that does not serve the target''s root gives it back this way, for another executor). Otherwise the deletion fails and the task shows deletion failed (DELETE again requeues it). Returns requeued | failed | LEASE_LOST | NOT_FOUND. Raises 42501 without an executor context.';

REVOKE ALL ON FUNCTION dlw.delete_task(uuid),
    dlw.executor_claim_deletions(integer, integer, text, integer),
    dlw.executor_deletion_heartbeat(uuid, uuid), dlw.executor_deletion_complete(uuid, uuid),
    dlw.executor_deletion_fail(uuid, uuid, text, boolean, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.delete_task(uuid),
    dlw.executor_claim_deletions(integer, integer, text, integer),
    dlw.executor_deletion_heartbeat(uuid, uuid), dlw.executor_deletion_complete(uuid, uuid),
    dlw.executor_deletion_fail(uuid, uuid, text, boolean, integer) TO dlw_app;

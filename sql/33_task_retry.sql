-- owner: dlw_owner
-- Tasks: retrying a failed task (POST /api/v1/tasks/{id}/retry). Invoker rights like
-- dlw.cancel_task (sql/31_task_admission.sql): the API calls it as dlw_app in the caller's tenant
-- context, so row-level security applies (another tenant's task reads as NOT_FOUND, a role that
-- may not write is refused by the policies).
--
-- A retry re-queues the files that did not succeed (the failed one and the ones its failure
-- cancelled; succeeded files stay done and counted), and is admitted against the quota again
-- exactly like a new task: the same prologue (dlw.admission_check: the lock, then the figures),
-- except the creation rate (a retry creates no task).
-- Lock order: the tenant's quota rows, then the task, then its files (as deactivation).

CREATE OR REPLACE FUNCTION dlw.retry_task(
    p_task_id uuid,
    p_lock_timeout_ms integer DEFAULT NULL,
    OUT outcome text,
    OUT metric text,
    OUT detail jsonb
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant       bigint := dlw.ctx_tenant_id();
    v_status       text;
    v_deletion     text;
    v_repo         text;
    v_active       boolean;
    v_requested    bigint;
    v_files        bigint;
    v_target       uuid;
    v_requeued     jsonb;
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.retry_task: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN  -- before any work (dlw.admission_check)
        RAISE EXCEPTION 'dlw.retry_task must run at READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    -- Before any lock: an unknown task (another tenant's included) or one that has not failed.
    SELECT x.status, x.deletion, x.storage_target_id INTO v_status, v_deletion, v_target
      FROM dlw.tasks x WHERE x.tenant_id = v_tenant AND x.id = p_task_id;
    IF NOT FOUND THEN
        outcome := 'NOT_FOUND';
        RETURN;
    END IF;
    IF v_deletion IS NOT NULL THEN  -- its files are being (or were) deleted (sql/44_executor_deletions.sql)
        outcome := 'TASK_DELETED';
        RETURN;
    END IF;
    IF v_status <> 'failed' THEN
        outcome := 'TASK_NOT_FAILED';
        RETURN;
    END IF;

    -- What a retry requeues (the failed and cancelled files): they do not change while the task
    -- has failed, and a concurrent retry is seen below (status no longer failed).
    SELECT coalesce(sum(f.size), 0), count(*),
           coalesce(jsonb_agg(jsonb_build_object('path', f.path, 'size', f.size, 'sha256', f.sha256)), '[]'::jsonb)
      INTO v_requested, v_files, v_requeued
      FROM dlw.task_files f
     WHERE f.tenant_id = v_tenant AND f.task_id = p_task_id AND f.status IN ('failed', 'cancelled');
    -- dlw.create_task's admission (the quota lock, then every figure from a fresh snapshot).
    SELECT a.active, a.metric, a.detail INTO v_active, metric, detail
      FROM dlw.admission_check(v_tenant, p_lock_timeout_ms, v_requested, false, v_target, v_requeued,
                               'dlw.retry_task') a;
    -- Lock order: the quota rows, then the task. FOR UPDATE also applies the UPDATE policies: a
    -- role that may not write sees nothing here.
    SELECT x.status, x.repo_id, x.deletion INTO v_status, v_repo, v_deletion
      FROM dlw.tasks x
     WHERE x.tenant_id = v_tenant AND x.id = p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dlw.retry_task: role % may not retry tasks', dlw.ctx_role() USING ERRCODE = '42501';
    END IF;
    IF v_deletion IS NOT NULL THEN  -- a deletion asked for meanwhile
        outcome := 'TASK_DELETED';
        RETURN;
    END IF;
    IF v_status <> 'failed' THEN  -- retried by a concurrent call meanwhile
        outcome := 'TASK_NOT_FAILED';
        metric := NULL;
        detail := NULL;
        RETURN;
    END IF;
    IF NOT v_active THEN
        outcome := 'TENANT_INACTIVE';
        metric := NULL;
        detail := NULL;
        RETURN;
    END IF;
    IF metric IS NOT NULL THEN
        PERFORM dlw.audit_repeat('quota.exceeded', NULL,
            detail || jsonb_build_object('repo_id', v_repo, 'retry_of', p_task_id));
        outcome := 'QUOTA_EXCEEDED';
        RETURN;
    END IF;

    -- Task first (the file guard admits failed | cancelled -> pending only under a pending task),
    -- then its files: fresh attempts, no backoff, no lease; the resume point is kept.
    UPDATE dlw.tasks x SET status = 'pending', error = NULL WHERE x.tenant_id = v_tenant AND x.id = p_task_id;
    UPDATE dlw.task_files f
       SET status = 'pending', attempts = 0, error = NULL, not_before = NULL, assignment_token = NULL,
           lease_expires_at = NULL, lease_seconds = NULL, bytes_done = 0
     WHERE f.tenant_id = v_tenant AND f.task_id = p_task_id AND f.status IN ('failed', 'cancelled');
    PERFORM dlw.audit_append(v_tenant, dlw.ctx_user_id(), 'task.retried', p_task_id::text,
        jsonb_build_object('files_requeued', v_files, 'bytes_requeued', v_requested));
    outcome := 'retried';
    detail := jsonb_build_object('files_requeued', v_files, 'bytes_requeued', v_requested);
END
$$;
COMMENT ON FUNCTION dlw.retry_task(uuid, integer) IS
$c$Retries a failed task of the current tenant: its failed and cancelled files return to the queue (pending, attempts 0, no backoff; their resume points kept), the task becomes pending again (error and finished_at cleared), with a task.retried audit row {files_requeued, bytes_requeued}. Admitted against the quota like dlw.create_task (the same dlw.admission_check: the requeued files' declared bytes and the storage of their contents the target does not hold; the creation rate is not checked: a retry creates no task); p_lock_timeout_ms bounds the lock wait (NULL = leave lock_timeout alone). Call as dlw_app at READ COMMITTED after dlw.set_context().
Returns one row (outcome, metric, detail): retried (detail {files_requeued, bytes_requeued}) | QUOTA_EXCEEDED (metric concurrent_tasks, bytes_month or storage_gb; detail as dlw.create_task's; counted on the audit trail by dlw.audit_repeat, must be committed) | TASK_NOT_FAILED (the task is pending, running, succeeded or cancelled) | TASK_DELETED (its files are being deleted or were deleted) | NOT_FOUND (also another tenant's id) | TENANT_INACTIVE.
Raises 55P03 lock timeout; 42501 without context or for a role that may not write; 25000 not READ COMMITTED.$c$;

REVOKE ALL ON FUNCTION dlw.retry_task(uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.retry_task(uuid, integer) TO dlw_app;

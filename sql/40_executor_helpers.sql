-- owner: dlw_owner
-- Executors: claim files under a lease, heartbeat, and complete, fail or release them.
-- This file: the internal helpers (owned by dlw_owner, invoker rights, EXECUTE for dlw_system
-- only); the definer entry points are in 41_executor_claim.sql and 42_executor_reports.sql.
--
-- Executors are services with an `executor` token, limited to one tenant or system-wide
-- (tid 0). A claim must look across tenants, so the functions the API calls are SECURITY
-- DEFINER, owned by dlw_system (BYPASSRLS), search_path pinned, EXECUTE for dlw_app only, and on
-- app/ops/catalog_check.py's allowlist. They take the executor's scope from the trusted request context
-- (dlw.set_context(<tenant or 0>, <subject>, 'executor'), set by the API from the verified
-- token) and refuse any other role: a tenant-limited executor never sees, changes or even
-- learns of another tenant's file (it reads as NOT_FOUND).
--
-- Leases. A claim gives each file a fresh random assignment_token and lease_expires_at; only
-- that token (compared exactly) may heartbeat, complete, fail or release the file, and only
-- while the lease runs. A wrong, stale or expired token gets LEASE_LOST and changes nothing.
-- Cancelling a task, a retry and an expiry clear the token: every lease on it is lost.
-- The lease machinery itself (lookup, requeue, sweep, failure with backoff, claim prologue) is
-- shared with task deletions: sql/38_work_leases.sql, kind 'file'.
-- Expired leases are swept back to the queue by every claim whose scope covers them (the
-- queue is only ever read by claims, so an expired lease never delays a file). The sweep reads
-- only the expired leases (an index on the expiry), never every lease in flight.
--
-- Rollup. The first claim of a task moves it pending -> running; the completion of its last
-- file moves it to succeeded; a file that fails finally (not retryable, sha256 mismatch, or
-- out of attempts) fails the task, and the task's other unfinished files are cancelled with
-- their leases (succeeded files stay succeeded: they were downloaded and are counted).
--
-- Usage. A completion appends the usage event (metric bytes_month, the bytes actually
-- downloaded, event_key file:<id>) in the same transaction as the succeeded transition;
-- the unique (tenant_id, event_key) makes a repeated report count once.
--
-- Lock order (as dlw.cancel_task): a task row before any of its file rows. Functions that
-- must change a task lock it first and wait; functions that hold file rows before they know
-- the task (the claim, the expiry sweep) never wait for a task: they take it with SKIP LOCKED
-- and leave the file for the next claim. So no cycle of waits can form.
--
-- Time: leases use clock_timestamp(), not the transaction start.

-- ---------------------------------------------------------------------------------------
-- Internal helpers (EXECUTE for dlw_system only: they run inside the definer functions)
-- ---------------------------------------------------------------------------------------

-- The expiry sweep was called dlw.executor_requeue_expired; it also fails files, hence its name.
DROP FUNCTION IF EXISTS dlw.executor_requeue_expired(bigint, integer, integer);

CREATE OR REPLACE FUNCTION dlw.lease_held(
    p_status text, p_token uuid, p_lease_expires_at timestamptz, p_given_token uuid, p_now timestamptz
) RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN p_status IN ('assigned', 'running') AND p_given_token IS NOT NULL
       AND p_token IS NOT DISTINCT FROM p_given_token AND NOT (p_lease_expires_at < p_now);
COMMENT ON FUNCTION dlw.lease_held(text, uuid, timestamptz, uuid, timestamptz) IS
    'Whether a report with p_given_token still holds the file''s lease at p_now: the file is assigned or running, the token is exactly the file''s, and the lease has not expired. Anything else is LEASE_LOST.';

CREATE OR REPLACE FUNCTION dlw.executor_scope() RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF dlw.ctx_role() IS DISTINCT FROM 'executor' OR dlw.ctx_tenant_id() IS NULL OR dlw.ctx_tenant_id() < 0 THEN
        RAISE EXCEPTION 'executor functions need an executor context, not role %', coalesce(dlw.ctx_role(), 'NULL')
            USING ERRCODE = '42501',
                  HINT = 'SELECT dlw.set_context(<tenant id, or 0 for every tenant>, <executor>, ''executor'')';
    END IF;
    RETURN nullif(dlw.ctx_tenant_id(), 0);
END
$$;
COMMENT ON FUNCTION dlw.executor_scope() IS
    'The tenant the acting executor is limited to (NULL = every tenant, a token with tid 0), from the request context; raises 42501 unless dlw.ctx_role() is executor.';

CREATE OR REPLACE FUNCTION dlw.requeue_file(
    p_tenant_id bigint, p_file_id uuid, p_error text, p_refund_attempt boolean DEFAULT false
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The caller holds the file row; the shared return to the queue (sql/38_work_leases.sql).
    IF dlw.lease_requeue_file(ARRAY[p_tenant_id], ARRAY[p_file_id], ARRAY[p_error], NULL, coalesce(p_refund_attempt, false)) > 0 THEN
        RETURN p_file_id;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.requeue_file(bigint, uuid, text, boolean) IS
    'Internal (caller holds the file row): puts a file back to pending, ending its lease (token, expiry and lease length cleared, bytes_done 0), with error p_error; p_refund_attempt also gives the claim back (attempts - 1). Returns the file id (NULL: no such file). dlw.lease_requeue_file for one file; kept for operators (docs/dba.md, break-glass).';

CREATE OR REPLACE FUNCTION dlw.executor_fail_final(p_tenant_id bigint, p_file_id uuid, p_error text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task      uuid;
    v_path      text;
    v_cancelled bigint;
BEGIN
    -- The caller holds the task row, then the file row (task before file).
    UPDATE dlw.task_files f
       SET status = 'failed', error = p_error, lease_expires_at = NULL
     WHERE f.tenant_id = p_tenant_id AND f.id = p_file_id
    RETURNING f.task_id, f.path INTO v_task, v_path;
    -- The task fails with it; its other unfinished files are cancelled and lose their leases.
    v_cancelled := dlw.cancel_unfinished_files(p_tenant_id, v_task, 'task failed', NULL, p_file_id);
    UPDATE dlw.tasks x SET status = 'running' WHERE x.tenant_id = p_tenant_id AND x.id = v_task AND x.status = 'pending';
    UPDATE dlw.tasks x SET status = 'failed', error = left(format('%s: %s', v_path, p_error), 2000)
     WHERE x.tenant_id = p_tenant_id AND x.id = v_task AND x.status = 'running';
    IF FOUND THEN
        PERFORM dlw.audit_append(p_tenant_id, coalesce(dlw.ctx_user_id(), 'dlw:executor-queue'), 'task.failed',
            v_task::text, jsonb_build_object('file_id', p_file_id, 'path', v_path, 'error', p_error,
                                             'files_cancelled', v_cancelled));
    END IF;
    RETURN (SELECT x.status FROM dlw.tasks x WHERE x.tenant_id = p_tenant_id AND x.id = v_task);
END
$$;
COMMENT ON FUNCTION dlw.executor_fail_final(bigint, uuid, text) IS
    'Internal (caller holds the task row, then the file row): the file fails finally, its task fails (task.failed audit row) and the task''s other unfinished files are cancelled, losing their leases. Returns the task status.';

CREATE OR REPLACE FUNCTION dlw.executor_sweep_expired_leases(p_scope bigint, p_max_attempts integer, p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
RETURN dlw.lease_sweep_file(p_scope, p_max_attempts, p_limit);
COMMENT ON FUNCTION dlw.executor_sweep_expired_leases(bigint, integer, integer) IS
    'Internal expiry sweep of file leases (NULL scope = every tenant): dlw.lease_sweep_file (sql/38_work_leases.sql). Assigned/running files whose lease expired return to pending with their token cleared while attempts < p_max_attempts; otherwise they fail finally with their task. Returns how many files it moved.';

-- The executor queue summary follows every change of task_files (sql/39_executor_queue.sql).
CREATE OR REPLACE TRIGGER task_files_queue_inserted
    AFTER INSERT ON dlw.task_files REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.task_files_queue_changed();
CREATE OR REPLACE TRIGGER task_files_queue_updated
    AFTER UPDATE ON dlw.task_files REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.task_files_queue_changed();
CREATE OR REPLACE TRIGGER task_files_queue_deleted
    AFTER DELETE ON dlw.task_files REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.task_files_queue_changed();
COMMENT ON TRIGGER task_files_queue_inserted ON dlw.task_files IS 'Executor queue summary: see dlw.task_files_queue_changed()';
COMMENT ON TRIGGER task_files_queue_updated ON dlw.task_files IS 'Executor queue summary: see dlw.task_files_queue_changed()';
COMMENT ON TRIGGER task_files_queue_deleted ON dlw.task_files IS 'Executor queue summary: see dlw.task_files_queue_changed()';

CREATE OR REPLACE FUNCTION dlw.retry_backoff(p_attempts integer, p_retry_after_seconds integer DEFAULT NULL)
RETURNS interval
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    -- Exponential with jitter in [1, 2): attempt n waits between base * 2^(n-1) and base * 2^n
    -- seconds (capped), so waits grow with attempts and executors failing together spread out.
    -- The hub's Retry-After wins when longer (capped at retry_after_max_seconds).
    SELECT make_interval(secs => greatest(
               least(f.retry_backoff_max_seconds,
                     f.retry_backoff_base_seconds * power(2, least(greatest(p_attempts, 1) - 1, 30)) * (1 + random())),
               least(greatest(coalesce(p_retry_after_seconds, 0), 0), f.retry_after_max_seconds)))
      FROM dlw.domain_facts() f;
$$;
COMMENT ON FUNCTION dlw.retry_backoff(integer, integer) IS
    'Internal: how long a file that failed retryably on attempt p_attempts waits before it is offered again: least(retry_backoff_max_seconds, retry_backoff_base_seconds * 2^(p_attempts-1) * (1 + random())), or p_retry_after_seconds (the hub''s Retry-After, capped at retry_after_max_seconds) when longer; see dlw.domain_facts().';

-- ---------------------------------------------------------------------------------------
-- Privileges: the helpers run only inside the definer functions of dlw_system.
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION dlw.lease_held(text, uuid, timestamptz, uuid, timestamptz),
    dlw.executor_scope(), dlw.requeue_file(bigint, uuid, text, boolean), dlw.executor_fail_final(bigint, uuid, text),
    dlw.executor_sweep_expired_leases(bigint, integer, integer), dlw.retry_backoff(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lease_held(text, uuid, timestamptz, uuid, timestamptz),
    dlw.executor_scope(), dlw.requeue_file(bigint, uuid, text, boolean), dlw.executor_fail_final(bigint, uuid, text),
    dlw.executor_sweep_expired_leases(bigint, integer, integer), dlw.retry_backoff(integer, integer) TO dlw_system;

-- owner: dlw_owner
-- Leases on executor work, one mechanism for every kind of work item: files to download
-- (dlw.task_files; sql/40-43) and task deletions (dlw.task_deletions; sql/44). Both kinds are
-- claimed under a lease, and every part of it is written once, here:
--   the locked-item lookup (scope, task lock, token and expiry check: LEASE_LOST / NOT_FOUND)
--     dlw.lease_lock;
--   the return to the queue (token, expiry and lease length cleared; backoff, attempt refund)
--     dlw.lease_requeue;
--   the expiry sweep every claim runs first (expired leases back to the queue while attempts
--     are left, else the item fails finally, task first) dlw.lease_sweep;
--   a failure report (retryable while attempts < max: requeued with exponential backoff,
--     dlw.retry_backoff; else fails finally) dlw.lease_fail;
--   the claim's prologue (executor context, argument limits, the sweep) dlw.lease_claim_begin.
-- What differs between kinds is one row of dlw.lease_kind: the table, the statuses that hold a
-- lease (spelled as the table's partial lease indexes are, so the sweep uses them), what else
-- a requeue resets, the final failure, and whether expiries count for /metrics.
--
-- Internal: invoker rights, EXECUTE for dlw_system only (they run inside the SECURITY DEFINER
-- entry points of dlw_system, which keep their own allowlist, grants and scope checks). The
-- statements name their table through dlw.lease_kind, a closed list of constants (never an
-- argument's text), so they are dynamic SQL: each is planned for its call, with the executor's
-- scope known, so it reads the index of that scope (across tenants: <table>_lease_expiry and
-- <table>_id_cross_tenant on dlw.cross_tenant_key; one tenant: its tenant-led indexes).
--
-- What stays per kind, and why: the claims themselves (the file claim ranks tenants from the
-- queue summary and starts tasks; the deletion claim takes the oldest request and computes its
-- plan: different selections and results, each one statement with its own pinned plan), the
-- heartbeats (a file's also records progress and a checkpoint, in the same row update), the
-- completions (a file's is set-based with usage and storage; a deletion's releases storage), and
-- the final failures (a file fails its task and cancels its siblings; a deletion marks the task's
-- deletion failed). Lock order everywhere: a task before its work items (sql/40_executor_helpers.sql).

CREATE OR REPLACE FUNCTION dlw.lease_kind(
    p_kind text,
    OUT work_table text, OUT held_statuses text, OUT requeue_also text, OUT fail_final text,
    OUT counts_expiries boolean
)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    CASE p_kind
    WHEN 'file' THEN
        work_table := 'dlw.task_files';
        held_statuses := $s$'assigned', 'running'$s$;    -- task_files_lease_expiry, task_files_in_flight
        requeue_also := 'bytes_done = 0';
        fail_final := 'dlw.executor_fail_final';
        counts_expiries := true;                        -- dlw_lease_expiries_total counts file leases
    WHEN 'deletion' THEN
        work_table := 'dlw.task_deletions';
        held_statuses := $s$'assigned'$s$;               -- task_deletions_lease_expiry, task_deletions_in_flight
        requeue_also := 'updated_at = now()';
        fail_final := 'dlw.deletion_fail_final';
        counts_expiries := false;
    ELSE
        RAISE EXCEPTION 'dlw.lease_kind: unknown kind of work %', coalesce(p_kind, 'NULL') USING ERRCODE = '22023';
    END CASE;
END
$$;
COMMENT ON FUNCTION dlw.lease_kind(text) IS
    'Internal: what differs between the kinds of leased work (file: dlw.task_files, deletion: dlw.task_deletions) for the shared lease functions: the table, the statuses that hold a lease (SQL list, as the partial lease indexes spell them), what a requeue also resets, the final-failure function (tenant, id, error) and whether expiries advance dlw.lease_expiries. A closed list of constants; 22023 for any other kind.';

CREATE OR REPLACE FUNCTION dlw.lease_lock(
    p_kind text, p_id uuid, p_assignment_token uuid, p_lock_task boolean,
    OUT refusal text, OUT tenant_id bigint, OUT task_id uuid, OUT task_status text,
    OUT status text, OUT assignment_token uuid, OUT attempts integer
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_scope bigint := dlw.executor_scope();  -- 42501 without an executor context
    v_kind  record := dlw.lease_kind(p_kind);
    v_held  boolean;
BEGIN
    -- The item by id in the executor's scope: across tenants by <table>_id_cross_tenant for a
    -- system-wide executor, by the primary key within its tenant otherwise.
    EXECUTE format('SELECT w.tenant_id, w.task_id FROM %s w WHERE %s AND w.id = $1', v_kind.work_table,
                   CASE WHEN v_scope IS NULL THEN 'dlw.cross_tenant_key(w.id) = dlw.cross_tenant_key($1)'
                        ELSE 'w.tenant_id = $2' END)
       INTO tenant_id, task_id USING p_id, v_scope;
    IF tenant_id IS NULL THEN
        refusal := 'NOT_FOUND';
        RETURN;
    END IF;
    -- Task before item (the lock order). The task lock also serialises the reports of one task
    -- that may change it (a file's last completion sees every other file succeeded).
    IF p_lock_task THEN
        SELECT x.status INTO task_status
          FROM dlw.tasks x
         WHERE x.tenant_id = lease_lock.tenant_id AND x.id = lease_lock.task_id
           FOR UPDATE;
    END IF;
    EXECUTE format('SELECT w.status, w.assignment_token, w.attempts,'
                   ' dlw.lease_held(w.status, w.assignment_token, w.lease_expires_at, $3, clock_timestamp())'
                   ' FROM %s w WHERE w.tenant_id = $1 AND w.id = $2 FOR UPDATE', v_kind.work_table)
       INTO status, assignment_token, attempts, v_held USING tenant_id, p_id, p_assignment_token;
    IF NOT coalesce(v_held, false) THEN
        refusal := 'LEASE_LOST';
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.lease_lock(text, uuid, uuid, boolean) IS
    'Internal (dlw_system, inside the executor reports of both kinds): finds the work item p_id of kind p_kind (dlw.lease_kind) in the acting executor''s scope (42501 without an executor context) and locks it, after its task when p_lock_task (task before item). Returns its figures, its task''s status (only when p_lock_task) and refusal: NULL while p_assignment_token holds the lease (dlw.lease_held), LEASE_LOST, or NOT_FOUND (no such item in scope; every other column NULL).';

CREATE OR REPLACE FUNCTION dlw.lease_requeue(
    p_kind text, p_tenant_ids bigint[], p_ids uuid[], p_errors text[],
    p_not_before timestamptz DEFAULT NULL, p_refund_attempt boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind  record := dlw.lease_kind(p_kind);
    v_moved integer;
BEGIN
    -- The caller holds the rows. Clearing the token ends the lease; one statement for the set
    -- (for files: one change row of the executor queue summary, whatever the count).
    EXECUTE format('UPDATE %s w SET status = ''pending'', assignment_token = NULL, lease_expires_at = NULL,'
                   ' lease_seconds = NULL, error = u.error, not_before = $4,'
                   ' attempts = CASE WHEN $5 THEN greatest(w.attempts - 1, 0) ELSE w.attempts END, %s'
                   ' FROM unnest($1, $2, $3) AS u(t, id, error) WHERE w.tenant_id = u.t AND w.id = u.id',
                   v_kind.work_table, v_kind.requeue_also)
       USING p_tenant_ids, p_ids, p_errors, p_not_before, coalesce(p_refund_attempt, false);
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    RETURN v_moved;
END
$$;
COMMENT ON FUNCTION dlw.lease_requeue(text, bigint[], uuid[], text[], timestamptz, boolean) IS
    'Internal (caller holds the rows): puts work items of kind p_kind (parallel arrays of tenant, id and error) back to pending in one statement, ending their leases (token, expiry and lease length cleared, and what dlw.lease_kind says, e.g. a file''s bytes_done), not offered before p_not_before (NULL: at once); p_refund_attempt gives the claim back (attempts - 1). Returns how many rows moved.';

CREATE OR REPLACE FUNCTION dlw.lease_fail_final(p_kind text, p_tenant_id bigint, p_id uuid, p_error text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_result text;
BEGIN
    EXECUTE format('SELECT %s($1, $2, $3)', (dlw.lease_kind(p_kind)).fail_final)
       INTO v_result USING p_tenant_id, p_id, p_error;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION dlw.lease_fail_final(text, bigint, uuid, text) IS
    'Internal (caller holds the task row, then the item''s): the work item fails finally, as its kind does it (dlw.lease_kind: dlw.executor_fail_final for a file, dlw.deletion_fail_final for a deletion). Returns what that function returns (the task''s status; failed for a deletion).';

CREATE OR REPLACE FUNCTION dlw.lease_sweep(p_kind text, p_scope bigint, p_max_attempts integer, p_limit integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind     record := dlw.lease_kind(p_kind);
    v_now      timestamptz := clock_timestamp();
    v_expired  text;
    v_order    text;
    v_tenants  bigint[];
    v_ids      uuid[];
    v_errors   text[];
    v_requeued integer := 0;
    v_failed   integer := 0;
    v_id       uuid;
    v_attempts integer;
    v_holder   text;
    r          record;
BEGIN
    -- Only expired leases are read: through <table>_lease_expiry for every tenant (NULL scope),
    -- through <table>_in_flight for one tenant. Nothing expired costs one index probe.
    v_expired := format('w.status IN (%s) AND %s', v_kind.held_statuses,
                        CASE WHEN p_scope IS NULL THEN 'dlw.cross_tenant_key(w.lease_expires_at) < $1'
                             ELSE 'w.tenant_id = $2 AND w.lease_expires_at < $1' END);
    v_order := CASE WHEN p_scope IS NULL THEN 'dlw.cross_tenant_key(w.lease_expires_at)' ELSE 'w.lease_expires_at' END;

    -- Items with attempts left return to the queue. Only the items change, so no task lock;
    -- SKIP LOCKED: an item being reported right now is re-checked by the next sweep.
    EXECUTE format('SELECT array_agg(e.tenant_id), array_agg(e.id),'
                   ' array_agg(left(format(''lease of %%s expired'', e.executor_id), 2000))'
                   ' FROM (SELECT w.tenant_id, w.id, w.executor_id FROM %s w WHERE %s AND w.attempts < $3'
                   ' ORDER BY %s LIMIT $4 FOR UPDATE SKIP LOCKED) e', v_kind.work_table, v_expired, v_order)
       INTO v_tenants, v_ids, v_errors USING v_now, p_scope, p_max_attempts, p_limit;
    IF v_ids IS NOT NULL THEN
        v_requeued := dlw.lease_requeue(p_kind, v_tenants, v_ids, v_errors);
    END IF;

    -- Out of attempts: the item fails finally, task first (SKIP LOCKED: a task a cancel or a
    -- report holds is left for the next sweep), then the item, re-checked. One item per task:
    -- a file's final failure fails its task and cancels the task's other files.
    FOR r IN EXECUTE format('SELECT DISTINCT x.tenant_id, x.task_id FROM (SELECT w.tenant_id, w.task_id FROM %s w'
                            ' WHERE %s AND w.attempts >= $3 LIMIT $4) x', v_kind.work_table, v_expired)
             USING v_now, p_scope, p_max_attempts, p_limit
    LOOP
        PERFORM 1 FROM dlw.tasks x WHERE x.tenant_id = r.tenant_id AND x.id = r.task_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        EXECUTE format('SELECT w.id, w.attempts, w.executor_id FROM %s w'
                       ' WHERE w.tenant_id = $1 AND w.task_id = $2 AND w.status IN (%s) AND w.lease_expires_at < $3'
                       ' AND w.attempts >= $4 ORDER BY w.id LIMIT 1 FOR UPDATE', v_kind.work_table, v_kind.held_statuses)
           INTO v_id, v_attempts, v_holder USING r.tenant_id, r.task_id, v_now, p_max_attempts;
        CONTINUE WHEN v_id IS NULL;
        PERFORM dlw.lease_fail_final(p_kind, r.tenant_id, v_id,
            format('lease expired on attempt %s of %s (last held by %s)', v_attempts, p_max_attempts, v_holder));
        v_failed := v_failed + 1;
    END LOOP;
    -- /metrics counts expiries of file leases (dlw_lease_expiries_total; migrations/0021).
    IF v_kind.counts_expiries THEN
        PERFORM nextval('dlw.lease_expiries') FROM generate_series(1, v_requeued + v_failed);
    END IF;
    RETURN v_requeued + v_failed;
END
$$;
COMMENT ON FUNCTION dlw.lease_sweep(text, bigint, integer, integer) IS
    'Internal expiry sweep of the leases of kind p_kind (run by every claim of that kind, for its scope; NULL = every tenant), at most p_limit items each way: held items whose lease expired return to pending with their token cleared while attempts < p_max_attempts (dlw.lease_requeue); otherwise they fail finally (dlw.lease_fail_final), task locked first. Reads only expired leases. Returns how many items it moved.';

CREATE OR REPLACE FUNCTION dlw.lease_fail(
    p_kind text, p_id uuid, p_assignment_token uuid, p_error text, p_retryable boolean, p_max_attempts integer,
    p_retry_after_seconds integer DEFAULT NULL,
    OUT outcome text, OUT task_status text
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v       record;
    v_error text := left(coalesce(nullif(p_error, ''), 'failed'), 2000);
    v_max   integer := coalesce(p_max_attempts, (SELECT f.default_max_attempts FROM dlw.domain_facts() f));
BEGIN
    SELECT * INTO v FROM dlw.lease_lock(p_kind, p_id, p_assignment_token, true);
    task_status := v.task_status;
    IF v.refusal IS NOT NULL THEN
        outcome := v.refusal;
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) AND v.attempts < v_max THEN
        -- Backoff, kept here so that no executor is offered the item before it expires.
        PERFORM dlw.lease_requeue(p_kind, ARRAY[v.tenant_id], ARRAY[p_id], ARRAY[v_error],
                                  clock_timestamp() + dlw.retry_backoff(v.attempts, p_retry_after_seconds));
        outcome := 'requeued';
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) THEN
        v_error := format('%s (attempt %s of %s)', v_error, v.attempts, v_max);
    END IF;
    outcome := 'failed';
    task_status := dlw.lease_fail_final(p_kind, v.tenant_id, p_id, v_error);
END
$$;
COMMENT ON FUNCTION dlw.lease_fail(text, uuid, uuid, text, boolean, integer, integer) IS
    'Internal (inside dlw.executor_fail and dlw.executor_deletion_fail): the holder of a live lease on item p_id of kind p_kind reports a failure. Retryable while attempts < p_max_attempts (NULL: domain_facts default_max_attempts): back to the queue, not offered before now + dlw.retry_backoff(attempts, p_retry_after_seconds). Otherwise the item fails finally (dlw.lease_fail_final). Returns (outcome, task_status): requeued | failed | LEASE_LOST | NOT_FOUND, and the task''s status (for a file; a deletion''s final failure gives failed).';

CREATE OR REPLACE FUNCTION dlw.lease_claim_begin(
    p_kind text, p_function text, p_max_name text, p_max integer, p_lease_seconds integer, p_max_attempts integer,
    p_executor text, p_sweep_limit integer,
    OUT scope bigint, OUT executor text
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_facts record;
BEGIN
    scope := dlw.executor_scope();  -- 42501 without an executor context, before the arguments
    SELECT f.claim_max_files, f.lease_seconds_min, f.lease_seconds_max INTO v_facts FROM dlw.domain_facts() f;
    IF p_max IS NULL OR p_max NOT BETWEEN 1 AND v_facts.claim_max_files THEN
        RAISE EXCEPTION '%: % must be 1..%, not %', p_function, p_max_name, v_facts.claim_max_files, p_max
            USING ERRCODE = '22023';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN v_facts.lease_seconds_min AND v_facts.lease_seconds_max THEN
        RAISE EXCEPTION '%: lease_seconds must be %..%, not %', p_function, v_facts.lease_seconds_min,
            v_facts.lease_seconds_max, p_lease_seconds USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION '%: max_attempts must be >= 1', p_function USING ERRCODE = '22023';
    END IF;
    -- The label recorded with each lease: <token subject>/<instance label>.
    executor := left(coalesce(dlw.ctx_user_id(), 'executor') || coalesce('/' || nullif(p_executor, ''), ''), 200);
    -- Expired leases of this scope return to the queue (or fail, out of attempts) first.
    PERFORM dlw.lease_sweep(p_kind, scope, p_max_attempts, p_sweep_limit);
END
$$;
COMMENT ON FUNCTION dlw.lease_claim_begin(text, text, text, integer, integer, integer, text, integer) IS
    'Internal (the first step of dlw.executor_claim and dlw.executor_claim_deletions): the acting executor''s scope (dlw.executor_scope: 42501 without an executor context), the claim''s limits (22023, named after p_function, for p_max outside 1..claim_max_files, lease_seconds outside lease_seconds_min..lease_seconds_max, max_attempts < 1; dlw.domain_facts()), the executor label recorded with each lease, and the expiry sweep of the scope (dlw.lease_sweep, at most p_sweep_limit items). Returns (scope, executor).';

REVOKE ALL ON FUNCTION dlw.lease_kind(text), dlw.lease_lock(text, uuid, uuid, boolean),
    dlw.lease_requeue(text, bigint[], uuid[], text[], timestamptz, boolean),
    dlw.lease_fail_final(text, bigint, uuid, text), dlw.lease_sweep(text, bigint, integer, integer),
    dlw.lease_fail(text, uuid, uuid, text, boolean, integer, integer),
    dlw.lease_claim_begin(text, text, text, integer, integer, integer, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lease_kind(text), dlw.lease_lock(text, uuid, uuid, boolean),
    dlw.lease_requeue(text, bigint[], uuid[], text[], timestamptz, boolean),
    dlw.lease_fail_final(text, bigint, uuid, text), dlw.lease_sweep(text, bigint, integer, integer),
    dlw.lease_fail(text, uuid, uuid, text, boolean, integer, integer),
    dlw.lease_claim_begin(text, text, text, integer, integer, integer, text, integer) TO dlw_system;

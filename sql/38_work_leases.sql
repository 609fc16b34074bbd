-- owner: dlw_owner
-- Leases on executor work, one mechanism for every kind of work item: files to download
-- (dlw.task_files; sql/40-43) and task deletions (dlw.task_deletions; sql/44). Each part of
-- it is written once, below, as a template, and made for each kind:
--   dlw.lease_lock_<kind>       the locked-item lookup: scope, task lock, token and expiry check
--                               (dlw.lease_held): LEASE_LOST / NOT_FOUND;
--   dlw.lease_requeue_<kind>    the return to the queue of a set of items (token, expiry and
--                               lease length cleared; backoff; attempt refund);
--   dlw.lease_sweep_<kind>      the expiry sweep every claim runs first: expired leases back to
--                               the queue while attempts are left, else the item fails finally,
--                               task first;
--   dlw.lease_fail_<kind>       a failure report: retryable while attempts < max (requeued with
--                               exponential backoff, dlw.retry_backoff), else final.
-- plus dlw.lease_claim_check, the claim's prologue (executor context, limits, executor label),
-- which touches no table and is one function.
--
-- Why a template, not one function taking the kind: a function that names its table at run
-- time runs dynamic SQL, planned again on every call (measured: the lookup 2.5x, the claim's
-- sweep 5x slower than static SQL, and no more cached plans on the paths issue 16 keeps flat).
-- Made per kind, every statement is static: PL/pgSQL caches its plan, and the sweep reads the
-- kind's own partial lease indexes (<table>_lease_expiry across tenants, <table>_in_flight for
-- one tenant), exactly as before. What differs between the kinds is one row of the list below
-- (and nothing else may differ: tests/sql/test_work_leases.py checks that the functions of both
-- kinds are the template with their row's values).
--
-- What stays per kind, and why: the claims themselves (the file claim ranks tenants from the
-- queue summary and starts tasks; the deletion claim finds tenants by a loose index scan and
-- computes its plan: different selections and results, each one statement with its own plan), the
-- heartbeats (a file's also records progress and a checkpoint, in the same row update), the
-- completions (a file's is set-based with usage and storage; a deletion's releases storage), and
-- the final failures (a file fails its task and cancels its siblings; a deletion marks the task's
-- deletion failed). Lock order everywhere: a task before its work items (sql/40_executor_helpers.sql).
--
-- Internal: invoker rights, search_path pinned, EXECUTE for dlw_system only (they run inside the
-- SECURITY DEFINER entry points of dlw_system, which keep their allowlist, grants and scope).

DO $make$
DECLARE
    -- The kinds of leased work. held: the statuses that hold a lease, as the table's partial
    -- lease indexes spell them; requeue_also: what else a return to the queue resets; fail_final:
    -- (tenant, id, error) -> text, the item's final failure (caller holds task, then item);
    -- count_expiries: whether expiries advance dlw.lease_expiries (/metrics counts file leases).
    v_kinds CONSTANT text[][] := ARRAY[
        -- kind        table                 held                      requeue_also           fail_final                 count_expiries
        ['file',     'dlw.task_files',     $$'assigned', 'running'$$, 'bytes_done = 0',     'dlw.executor_fail_final', 'true'],
        ['deletion', 'dlw.task_deletions', $$'assigned'$$,            'updated_at = now()', 'dlw.deletion_fail_final', 'false']
    ];
    v_tokens CONSTANT text[] := ARRAY['{kind}', '{table}', '{held}', '{requeue_also}', '{fail_final}', '{count_expiries}'];
    -- What the template makes for each kind, for its privileges: dlw_system only.
    v_made CONSTANT text := 'dlw.lease_lock_{kind}(uuid, uuid, boolean),'
        ' dlw.lease_requeue_{kind}(bigint[], uuid[], text[], timestamptz, boolean),'
        ' dlw.lease_sweep_{kind}(bigint, integer, integer), dlw.lease_fail_{kind}(uuid, uuid, text, boolean, integer, integer)';
    v_template CONSTANT text[] := ARRAY[
$t$
CREATE OR REPLACE FUNCTION dlw.lease_lock_{kind}(
    p_id uuid, p_assignment_token uuid, p_lock_task boolean,
    OUT refusal text, OUT tenant_id bigint, OUT task_id uuid, OUT task_status text,
    OUT status text, OUT assignment_token uuid, OUT attempts integer
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_scope bigint := dlw.executor_scope();  -- 42501 without an executor context
    v_held  boolean;
BEGIN
    IF v_scope IS NULL THEN
        -- A system-wide executor: the item by id across tenants (<table>_id_cross_tenant).
        SELECT w.tenant_id, w.task_id INTO tenant_id, task_id
          FROM {table} w
         WHERE dlw.cross_tenant_key(w.id) = dlw.cross_tenant_key(p_id) AND w.id = p_id;
    ELSE
        SELECT w.tenant_id, w.task_id INTO tenant_id, task_id
          FROM {table} w
         WHERE w.tenant_id = v_scope AND w.id = p_id;
    END IF;
    IF NOT FOUND THEN
        refusal := 'NOT_FOUND';
        RETURN;
    END IF;
    -- Task before item (the lock order). The task lock also serialises the reports of one task
    -- that may change it (a file's last completion sees every other file succeeded).
    IF p_lock_task THEN
        SELECT x.status INTO task_status
          FROM dlw.tasks x
         WHERE x.tenant_id = lease_lock_{kind}.tenant_id AND x.id = lease_lock_{kind}.task_id
           FOR UPDATE;
    END IF;
    SELECT w.status, w.assignment_token, w.attempts,
           dlw.lease_held(w.status, w.assignment_token, w.lease_expires_at, p_assignment_token, clock_timestamp())
      INTO status, assignment_token, attempts, v_held
      FROM {table} w
     WHERE w.tenant_id = lease_lock_{kind}.tenant_id AND w.id = p_id
       FOR UPDATE;
    IF NOT coalesce(v_held, false) THEN
        refusal := 'LEASE_LOST';
    END IF;
END
$fn$
$t$,
$t$
COMMENT ON FUNCTION dlw.lease_lock_{kind}(uuid, uuid, boolean) IS
    'Internal (dlw_system, inside the executor reports; made from the lease template of sql/38_work_leases.sql for kind {kind}, {table}): finds work item p_id in the acting executor''s scope (42501 without an executor context) and locks it, after its task when p_lock_task (task before item). Returns its figures, its task''s status (only when p_lock_task) and refusal: NULL while p_assignment_token holds the lease (dlw.lease_held), LEASE_LOST, or NOT_FOUND (no such item in scope; every other column NULL).'
$t$,
$t$
CREATE OR REPLACE FUNCTION dlw.lease_requeue_{kind}(
    p_tenant_ids bigint[], p_ids uuid[], p_errors text[],
    p_not_before timestamptz DEFAULT NULL, p_refund_attempt boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_moved integer;
BEGIN
    -- The caller holds the rows. Clearing the token ends the lease; one statement for the set
    -- (for files: one change row of the executor queue summary, whatever the count).
    UPDATE {table} w
       SET status = 'pending', assignment_token = NULL, lease_expires_at = NULL, lease_seconds = NULL,
           error = u.error, not_before = p_not_before,
           attempts = CASE WHEN p_refund_attempt THEN greatest(w.attempts - 1, 0) ELSE w.attempts END,
           {requeue_also}
      FROM unnest(p_tenant_ids, p_ids, p_errors) AS u(t, id, error)
     WHERE w.tenant_id = u.t AND w.id = u.id;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    RETURN v_moved;
END
$fn$
$t$,
$t$
COMMENT ON FUNCTION dlw.lease_requeue_{kind}(bigint[], uuid[], text[], timestamptz, boolean) IS
    'Internal (caller holds the rows; made from the lease template of sql/38_work_leases.sql for kind {kind}, {table}): puts the items (parallel arrays of tenant, id and error) back to pending in one statement, ending their leases (token, expiry and lease length cleared; also {requeue_also}), not offered before p_not_before (NULL: at once); p_refund_attempt gives the claim back (attempts - 1). Returns how many rows moved.'
$t$,
$t$
CREATE OR REPLACE FUNCTION dlw.lease_sweep_{kind}(p_scope bigint, p_max_attempts integer, p_limit integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_tenants  bigint[];
    v_ids      uuid[];
    v_holders  text[];
    v_requeued integer := 0;
    v_failed   integer := 0;
    v_item     record;
    r          record;
BEGIN
    -- Only expired leases are read: through <table>_lease_expiry for every tenant (NULL scope),
    -- through <table>_in_flight for one tenant. Nothing expired costs one index probe. Items
    -- with attempts left return to the queue; only the items change, so no task lock. SKIP
    -- LOCKED: an item being reported right now is re-checked by the next sweep.
    IF p_scope IS NULL THEN
        SELECT array_agg(e.tenant_id), array_agg(e.id), array_agg(e.executor_id) INTO v_tenants, v_ids, v_holders
          FROM (SELECT w.tenant_id, w.id, w.executor_id
                  FROM {table} w
                 WHERE w.status IN ({held}) AND dlw.cross_tenant_key(w.lease_expires_at) < v_now
                   AND w.attempts < p_max_attempts
                 ORDER BY dlw.cross_tenant_key(w.lease_expires_at)
                 LIMIT p_limit
                   FOR UPDATE SKIP LOCKED) e;
    ELSE
        SELECT array_agg(e.tenant_id), array_agg(e.id), array_agg(e.executor_id) INTO v_tenants, v_ids, v_holders
          FROM (SELECT w.tenant_id, w.id, w.executor_id
                  FROM {table} w
                 WHERE w.tenant_id = p_scope AND w.status IN ({held}) AND w.lease_expires_at < v_now
                   AND w.attempts < p_max_attempts
                 ORDER BY w.lease_expires_at
                 LIMIT p_limit
                   FOR UPDATE SKIP LOCKED) e;
    END IF;
    IF v_ids IS NOT NULL THEN
        v_requeued := dlw.lease_requeue_{kind}(v_tenants, v_ids,
            ARRAY(SELECT left(format('lease of %s expired', h), 2000) FROM unnest(v_holders) WITH ORDINALITY AS u(h, n)
                   ORDER BY u.n));
    END IF;

    -- Out of attempts: the item fails finally, task first (SKIP LOCKED: a task a cancel or a
    -- report holds is left for the next sweep), then the item, re-checked. One item per task:
    -- a file's final failure fails its task and cancels the task's other files.
    FOR r IN
        SELECT DISTINCT x.tenant_id, x.task_id
          FROM (SELECT w.tenant_id, w.task_id
                  FROM {table} w
                 WHERE p_scope IS NULL
                   AND w.status IN ({held}) AND dlw.cross_tenant_key(w.lease_expires_at) < v_now
                   AND w.attempts >= p_max_attempts
                 LIMIT p_limit) x
        UNION
        SELECT DISTINCT y.tenant_id, y.task_id
          FROM (SELECT w.tenant_id, w.task_id
                  FROM {table} w
                 WHERE w.tenant_id = p_scope
                   AND w.status IN ({held}) AND w.lease_expires_at < v_now
                   AND w.attempts >= p_max_attempts
                 LIMIT p_limit) y
    LOOP
        PERFORM 1 FROM dlw.tasks x WHERE x.tenant_id = r.tenant_id AND x.id = r.task_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        SELECT w.id, w.attempts, w.executor_id INTO v_item
          FROM {table} w
         WHERE w.tenant_id = r.tenant_id AND w.task_id = r.task_id
           AND w.status IN ({held}) AND w.lease_expires_at < v_now AND w.attempts >= p_max_attempts
         ORDER BY w.id
         LIMIT 1
           FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        PERFORM {fail_final}(r.tenant_id, v_item.id,
            format('lease expired on attempt %s of %s (last held by %s)', v_item.attempts, p_max_attempts,
                   v_item.executor_id));
        v_failed := v_failed + 1;
    END LOOP;
    -- /metrics counts expiries (dlw_lease_expiries_total; migrations/0021).
    IF {count_expiries} THEN
        PERFORM nextval('dlw.lease_expiries') FROM generate_series(1, v_requeued + v_failed);
    END IF;
    RETURN v_requeued + v_failed;
END
$fn$
$t$,
$t$
COMMENT ON FUNCTION dlw.lease_sweep_{kind}(bigint, integer, integer) IS
    'Internal expiry sweep (made from the lease template of sql/38_work_leases.sql for kind {kind}, {table}; run by every claim of that kind, for its scope; NULL = every tenant), at most p_limit items each way: held items whose lease expired return to pending with their token cleared while attempts < p_max_attempts (dlw.lease_requeue_{kind}); otherwise they fail finally ({fail_final}), task locked first. Reads only expired leases. Returns how many items it moved.'
$t$,
$t$
CREATE OR REPLACE FUNCTION dlw.lease_fail_{kind}(
    p_id uuid, p_assignment_token uuid, p_error text, p_retryable boolean, p_max_attempts integer,
    p_retry_after_seconds integer DEFAULT NULL,
    OUT outcome text, OUT task_status text
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v       record;
    v_error text := left(coalesce(nullif(p_error, ''), 'failed'), 2000);
    v_max   integer := coalesce(p_max_attempts, (SELECT f.default_max_attempts FROM dlw.domain_facts() f));
BEGIN
    SELECT * INTO v FROM dlw.lease_lock_{kind}(p_id, p_assignment_token, true);
    task_status := v.task_status;
    IF v.refusal IS NOT NULL THEN
        outcome := v.refusal;
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) AND v.attempts < v_max THEN
        -- Backoff, kept here so that no executor is offered the item before it expires.
        PERFORM dlw.lease_requeue_{kind}(ARRAY[v.tenant_id], ARRAY[p_id], ARRAY[v_error],
                                         clock_timestamp() + dlw.retry_backoff(v.attempts, p_retry_after_seconds));
        outcome := 'requeued';
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) THEN
        v_error := format('%s (attempt %s of %s)', v_error, v.attempts, v_max);
    END IF;
    outcome := 'failed';
    task_status := {fail_final}(v.tenant_id, p_id, v_error);
END
$fn$
$t$,
$t$
COMMENT ON FUNCTION dlw.lease_fail_{kind}(uuid, uuid, text, boolean, integer, integer) IS
    'Internal (made from the lease template of sql/38_work_leases.sql for kind {kind}, {table}): the holder of a live lease on item p_id reports a failure. Retryable while attempts < p_max_attempts (NULL: domain_facts default_max_attempts): back to the queue, not offered before now + dlw.retry_backoff(attempts, p_retry_after_seconds). Otherwise the item fails finally ({fail_final}). Returns (outcome, task_status): requeued | failed | LEASE_LOST | NOT_FOUND, and the task''s status as the lookup or the final failure gives it.'
$t$,
$t$
REVOKE ALL ON FUNCTION {made} FROM PUBLIC
$t$,
$t$
GRANT EXECUTE ON FUNCTION {made} TO dlw_system
$t$
    ];
    v_statement text;
BEGIN
    FOR k IN 1 .. array_length(v_kinds, 1) LOOP
        FOREACH v_statement IN ARRAY v_template LOOP
            v_statement := replace(v_statement, '{made}', v_made);
            FOR t IN 1 .. array_length(v_tokens, 1) LOOP
                v_statement := replace(v_statement, v_tokens[t], v_kinds[k][t]);
            END LOOP;
            EXECUTE v_statement;
        END LOOP;
    END LOOP;
END
$make$;

CREATE OR REPLACE FUNCTION dlw.lease_claim_check(
    p_function text, p_max_name text, p_max integer, p_lease_seconds integer, p_max_attempts integer,
    p_executor text,
    OUT scope bigint, OUT executor text
)
LANGUAGE plpgsql STABLE
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
END
$$;
COMMENT ON FUNCTION dlw.lease_claim_check(text, text, integer, integer, integer, text) IS
    'Internal (the first step of dlw.executor_claim and dlw.executor_claim_deletions, before their expiry sweep): the acting executor''s scope (dlw.executor_scope: 42501 without an executor context), the claim''s limits (22023, named after p_function: p_max, called p_max_name, outside 1..claim_max_files, lease_seconds outside lease_seconds_min..lease_seconds_max, max_attempts < 1; dlw.domain_facts()) and the executor label recorded with each lease. Returns (scope, executor).';
REVOKE ALL ON FUNCTION dlw.lease_claim_check(text, text, integer, integer, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lease_claim_check(text, text, integer, integer, integer, text) TO dlw_system;

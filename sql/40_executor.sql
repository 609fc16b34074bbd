-- Executors: claim files under a lease, heartbeat, and complete, fail or release them.
--
-- Executors are services with an `executor` token, limited to one tenant or system-wide
-- (tid 0). A claim must look across tenants, so the functions the API calls are SECURITY
-- DEFINER, owned by dlw_system (BYPASSRLS), search_path pinned, EXECUTE for dlw_app only, and on
-- app/doctor.py's allowlist. They take the executor's scope from the trusted request context
-- (dlw.set_context(<tenant or 0>, <subject>, 'executor'), set by the API from the verified
-- token) and refuse any other role: a tenant-limited executor never sees, changes or even
-- learns of another tenant's file (it reads as NOT_FOUND).
--
-- Leases. A claim gives each file a fresh random assignment_token and lease_expires_at; only
-- that token (compared exactly) may heartbeat, complete, fail or release the file, and only
-- while the lease runs. A wrong, stale or expired token gets LEASE_LOST and changes nothing.
-- Cancelling a task, a retry and an expiry clear the token: every lease on it is lost.
-- Expired leases are swept back to the queue by every claim whose scope covers them (the
-- queue is only ever read by claims, so an expired lease never delays a file).
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
    UPDATE dlw.task_files f
       SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL, error = 'task failed'
     WHERE f.tenant_id = p_tenant_id AND f.task_id = v_task AND f.id <> p_file_id
       AND f.status IN ('pending', 'assigned', 'running');
    GET DIAGNOSTICS v_cancelled = ROW_COUNT;
    UPDATE dlw.tasks x SET status = 'running' WHERE x.tenant_id = p_tenant_id AND x.id = v_task AND x.status = 'pending';
    UPDATE dlw.tasks x SET status = 'failed', error = left(format('%s: %s', v_path, p_error), 2000)
     WHERE x.tenant_id = p_tenant_id AND x.id = v_task AND x.status = 'running';
    IF FOUND THEN
        INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
        VALUES (p_tenant_id, coalesce(dlw.ctx_user_id(), 'dlw:executor-queue'), 'task.failed', v_task::text,
                jsonb_build_object('file_id', p_file_id, 'path', v_path, 'error', p_error,
                                   'files_cancelled', v_cancelled));
    END IF;
    RETURN (SELECT x.status FROM dlw.tasks x WHERE x.tenant_id = p_tenant_id AND x.id = v_task);
END
$$;
COMMENT ON FUNCTION dlw.executor_fail_final(bigint, uuid, text) IS
    'Internal (caller holds the task row, then the file row): the file fails finally, its task fails (task.failed audit row) and the task''s other unfinished files are cancelled, losing their leases. Returns the task status.';

CREATE OR REPLACE FUNCTION dlw.executor_requeue_expired(p_scope bigint, p_max_attempts integer, p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_requeued integer;
    v_failed   integer := 0;
    r          record;
    v_file     record;
BEGIN
    -- Files with attempts left return to the queue. Only the file changes, so no task lock;
    -- SKIP LOCKED: a file being heartbeaten right now is re-checked by the next sweep.
    WITH expired AS (
        SELECT f.tenant_id, f.id
          FROM dlw.task_files f
         WHERE f.status IN ('assigned', 'running') AND f.lease_expires_at < v_now
           AND f.attempts < p_max_attempts
           AND f.tenant_id >= coalesce(p_scope, 0) AND f.tenant_id <= coalesce(p_scope, 9223372036854775807)
         ORDER BY f.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE dlw.task_files f
       SET status = 'pending', assignment_token = NULL, lease_expires_at = NULL, lease_seconds = NULL,
           bytes_done = 0, error = left(format('lease of %s expired', f.executor_id), 2000)
      FROM expired e
     WHERE f.tenant_id = e.tenant_id AND f.id = e.id;
    GET DIAGNOSTICS v_requeued = ROW_COUNT;

    -- Files out of attempts fail, and so does their task: task first (SKIP LOCKED: a task a
    -- cancel or completion holds is left for the next sweep), then the file, re-checked.
    FOR r IN
        SELECT DISTINCT f.tenant_id, f.task_id
          FROM dlw.task_files f
         WHERE f.status IN ('assigned', 'running') AND f.lease_expires_at < v_now
           AND f.attempts >= p_max_attempts
           AND f.tenant_id >= coalesce(p_scope, 0) AND f.tenant_id <= coalesce(p_scope, 9223372036854775807)
         LIMIT p_limit
    LOOP
        PERFORM 1 FROM dlw.tasks x WHERE x.tenant_id = r.tenant_id AND x.id = r.task_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        SELECT f.id, f.attempts, f.executor_id INTO v_file
          FROM dlw.task_files f
         WHERE f.tenant_id = r.tenant_id AND f.task_id = r.task_id
           AND f.status IN ('assigned', 'running') AND f.lease_expires_at < v_now AND f.attempts >= p_max_attempts
         ORDER BY f.id
         LIMIT 1
           FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        PERFORM dlw.executor_fail_final(r.tenant_id, v_file.id,
            format('lease expired on attempt %s of %s (last held by %s)', v_file.attempts, p_max_attempts,
                   v_file.executor_id));
        v_failed := v_failed + 1;
    END LOOP;
    RETURN v_requeued + v_failed;
END
$$;
COMMENT ON FUNCTION dlw.executor_requeue_expired(bigint, integer, integer) IS
    'Internal expiry sweep (run by every claim, for its scope; NULL = every tenant): assigned/running files whose lease expired return to pending with their token cleared while attempts < p_max_attempts; otherwise they fail finally with their task. Returns how many files it moved.';

-- ---------------------------------------------------------------------------------------
-- The executor API (SECURITY DEFINER, owned by dlw_system)
-- ---------------------------------------------------------------------------------------

SET ROLE dlw_system;

CREATE OR REPLACE FUNCTION dlw.executor_claim(
    p_max_files integer,
    p_lease_seconds integer,
    p_executor text DEFAULT NULL,
    p_max_attempts integer DEFAULT 5
)
RETURNS TABLE (
    file_id uuid,
    task_id uuid,
    tenant_id bigint,
    tenant_slug text,
    repo_id text,
    revision text,
    path text,
    size bigint,
    sha256 text,
    priority integer,
    attempts integer,
    assignment_token uuid,
    lease_seconds integer,
    lease_expires_at timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope    bigint := dlw.executor_scope();
    v_now      timestamptz := clock_timestamp();
    v_executor text := left(coalesce(dlw.ctx_user_id(), 'executor') || coalesce('/' || nullif(p_executor, ''), ''), 200);
    v_tenants  bigint[];
    v_files    uuid[];
    v_tasks    uuid[];
BEGIN
    IF p_max_files IS NULL OR p_max_files NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'dlw.executor_claim: max_files must be 1..1000, not %', p_max_files USING ERRCODE = '22023';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
        RAISE EXCEPTION 'dlw.executor_claim: lease_seconds must be 1..86400, not %', p_lease_seconds
            USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'dlw.executor_claim: max_attempts must be >= 1' USING ERRCODE = '22023';
    END IF;

    -- 0. Expired leases in this executor's scope return to the queue (or fail, out of attempts).
    PERFORM dlw.executor_requeue_expired(v_scope, p_max_attempts);

    -- 1. Fair shares, without locks. Tenants with pending files are found by a skip scan of
    --    the queue index (one probe per such tenant, not per file). Each tenant's best
    --    p_max_files files (priority DESC, then oldest) are ranked 1, 2, ...; a file's turn is
    --    its tenant's files in flight + its rank, so the tenant with the fewest leases is
    --    served first and one busy tenant cannot starve the others (max-min fairness; ties go
    --    to the tenant whose waiting file is oldest, then at random).
    -- 2. Each chosen tenant's share is then locked with SKIP LOCKED (a concurrent claimer
    --    gets other files; this claim may return fewer than its share, never waits).
    WITH RECURSIVE busy_scan (tenant_id) AS (
        (SELECT f.tenant_id FROM dlw.task_files f
          WHERE f.status = 'pending' AND f.tenant_id >= coalesce(v_scope, 0)
          ORDER BY f.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT f.tenant_id FROM dlw.task_files f
                 WHERE f.status = 'pending' AND f.tenant_id > b.tenant_id
                 ORDER BY f.tenant_id LIMIT 1)
          FROM busy_scan b
         WHERE b.tenant_id IS NOT NULL AND v_scope IS NULL
    ), busy AS (
        SELECT b.tenant_id FROM busy_scan b
         WHERE b.tenant_id IS NOT NULL AND (v_scope IS NULL OR b.tenant_id = v_scope)
    ), in_flight AS (
        SELECT f.tenant_id, count(*) AS n
          FROM dlw.task_files f
         WHERE f.status IN ('assigned', 'running') AND f.tenant_id IN (SELECT b.tenant_id FROM busy b)
         GROUP BY f.tenant_id
    ), heads AS (
        SELECT c.tenant_id,
               row_number() OVER (PARTITION BY c.tenant_id ORDER BY c.priority DESC, c.created_at, c.id) AS rank,
               min(c.created_at) OVER (PARTITION BY c.tenant_id) AS oldest
          FROM busy b
         CROSS JOIN LATERAL (
               SELECT f.tenant_id, f.id, f.priority, f.created_at
                 FROM dlw.task_files f
                WHERE f.tenant_id = b.tenant_id AND f.status = 'pending'
                ORDER BY f.priority DESC, f.created_at
                LIMIT p_max_files) c
    ), chosen AS (
        SELECT h.tenant_id
          FROM heads h
          LEFT JOIN in_flight i ON i.tenant_id = h.tenant_id
         ORDER BY coalesce(i.n, 0) + h.rank, h.oldest, random()
         LIMIT p_max_files
    ), shares AS (
        SELECT c.tenant_id, count(*) AS n FROM chosen c GROUP BY c.tenant_id
    )
    SELECT array_agg(l.tenant_id), array_agg(l.id), array_agg(l.task_id)
      INTO v_tenants, v_files, v_tasks
      FROM shares s
     CROSS JOIN LATERAL (
           SELECT f.tenant_id, f.id, f.task_id
             FROM dlw.task_files f
            WHERE f.tenant_id = s.tenant_id AND f.status = 'pending'
            ORDER BY f.priority DESC, f.created_at
            LIMIT s.n
              FOR UPDATE SKIP LOCKED) l;
    IF v_files IS NULL THEN
        RETURN;
    END IF;

    -- 3. The first claim of a task starts it. These files are held before their task, so the
    --    task is taken with SKIP LOCKED (never a wait: a cancel or completion holding it may be
    --    waiting for one of these files). A pending task someone else holds is skipped below.
    WITH startable AS (
        SELECT x.tenant_id, x.id
          FROM dlw.tasks x
         WHERE (x.tenant_id, x.id) IN (SELECT u.t, u.k FROM unnest(v_tenants, v_tasks) AS u(t, k))
           AND x.status = 'pending'
         ORDER BY x.tenant_id, x.id
           FOR NO KEY UPDATE SKIP LOCKED
    )
    UPDATE dlw.tasks x SET status = 'running'
      FROM startable s
     WHERE x.tenant_id = s.tenant_id AND x.id = s.id;

    -- 4. A later statement (fresh snapshot, sees step 3): assign the files whose task runs.
    RETURN QUERY
    WITH mine AS (
        SELECT u.t AS tenant_id, u.f AS id
          FROM unnest(v_tenants, v_files, v_tasks) AS u(t, f, k)
          JOIN dlw.tasks x ON x.tenant_id = u.t AND x.id = u.k
         WHERE x.status = 'running'
    ), assigned AS (
        UPDATE dlw.task_files f
           SET status = 'assigned',
               assignment_token = gen_random_uuid(),
               lease_seconds = p_lease_seconds,
               lease_expires_at = v_now + make_interval(secs => p_lease_seconds),
               attempts = f.attempts + 1,
               executor_id = v_executor,
               bytes_done = 0,
               error = NULL
          FROM mine m
         WHERE f.tenant_id = m.tenant_id AND f.id = m.id
        RETURNING f.tenant_id, f.id, f.task_id, f.path, f.size, f.sha256, f.priority, f.attempts,
                  f.assignment_token, f.lease_seconds, f.lease_expires_at
    )
    SELECT a.id, a.task_id, a.tenant_id, t.slug, x.repo_id, x.revision, a.path, a.size, a.sha256, a.priority,
           a.attempts, a.assignment_token, a.lease_seconds, a.lease_expires_at
      FROM assigned a
      JOIN dlw.tasks x ON x.tenant_id = a.tenant_id AND x.id = a.task_id
      JOIN dlw.tenants t ON t.tenant_id = a.tenant_id
     ORDER BY a.priority DESC, a.tenant_id, a.path;
END
$$;
COMMENT ON FUNCTION dlw.executor_claim(integer, integer, text, integer) IS
$c$Claims up to p_max_files files for the acting executor (context role executor; its tenant, or every tenant for tenant 0) under a lease of p_lease_seconds, after returning expired leases of its scope to the queue (a file out of its p_max_attempts fails, with its task).
Fair across tenants (the tenant with the fewest files in flight first, so one busy tenant starves nobody), priority order (then oldest) within a tenant; files locked with FOR UPDATE SKIP LOCKED, so concurrent claims get disjoint files and never wait. Each file gets a fresh assignment_token (gen_random_uuid()), attempts + 1, status assigned; the first claim of a task moves it to running.
Returns one row per claimed file (possibly none). p_executor is an instance label recorded in task_files.executor_id after the token subject.
Raises 42501 without an executor context; 22023 for max_files outside 1..1000, lease_seconds outside 1..86400, max_attempts < 1.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_heartbeat(p_file_id uuid, p_assignment_token uuid, p_bytes_done bigint DEFAULT NULL)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope bigint := dlw.executor_scope();
    v_now   timestamptz := clock_timestamp();
    v_file  record;
BEGIN
    -- Only the file changes (assigned -> running, the lease), so only the file is locked.
    SELECT f.tenant_id, f.id, f.status, f.assignment_token, f.lease_expires_at, f.lease_seconds INTO v_file
      FROM dlw.task_files f
     WHERE f.id = p_file_id AND (v_scope IS NULL OR f.tenant_id = v_scope)
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'NOT_FOUND'::text, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT dlw.lease_held(v_file.status, v_file.assignment_token, v_file.lease_expires_at,
                          p_assignment_token, v_now) THEN
        RETURN QUERY SELECT 'LEASE_LOST'::text, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE dlw.task_files f
       SET status = 'running',
           lease_expires_at = v_now + make_interval(secs => f.lease_seconds),
           bytes_done = CASE WHEN p_bytes_done IS NULL THEN f.bytes_done ELSE greatest(p_bytes_done, 0) END
     WHERE f.tenant_id = v_file.tenant_id AND f.id = v_file.id
    RETURNING 'ok'::text, f.lease_expires_at;
END
$$;
COMMENT ON FUNCTION dlw.executor_heartbeat(uuid, uuid, bigint) IS
    'The holder of a live lease reports progress: the file becomes running, its lease is extended by its lease_seconds from now, bytes_done is recorded (NULL keeps it). Returns (outcome, lease_expires_at): ok | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor''s scope). Raises 42501 without an executor context.';

CREATE OR REPLACE FUNCTION dlw.executor_complete(
    p_file_id uuid, p_assignment_token uuid, p_bytes bigint, p_sha256 text
)
RETURNS TABLE (outcome text, task_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope  bigint := dlw.executor_scope();
    v_now    timestamptz := clock_timestamp();
    v_tenant bigint;
    v_task   uuid;
    v_status text;
    v_file   record;
    v_sha    text := lower(p_sha256);
BEGIN
    IF p_bytes IS NULL OR p_bytes < 0 THEN
        RAISE EXCEPTION 'dlw.executor_complete: bytes must be >= 0' USING ERRCODE = '22023';
    END IF;
    SELECT f.tenant_id, f.task_id INTO v_tenant, v_task
      FROM dlw.task_files f
     WHERE f.id = p_file_id AND (v_scope IS NULL OR f.tenant_id = v_scope);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'NOT_FOUND'::text, NULL::text;
        RETURN;
    END IF;
    -- Task before file; the task lock also serialises the completions of one task, so the
    -- last one sees every other file succeeded (later statements, fresh snapshots).
    SELECT x.status INTO v_status FROM dlw.tasks x WHERE x.tenant_id = v_tenant AND x.id = v_task FOR UPDATE;
    SELECT f.status, f.assignment_token, f.lease_expires_at, f.sha256, f.path INTO v_file
      FROM dlw.task_files f
     WHERE f.tenant_id = v_tenant AND f.id = p_file_id
       FOR UPDATE;

    -- The same report again (a retry after a lost answer): the same success, counted once.
    IF v_file.status = 'succeeded' AND p_assignment_token IS NOT NULL
       AND v_file.assignment_token = p_assignment_token THEN
        RETURN QUERY SELECT 'already_completed'::text, v_status;
        RETURN;
    END IF;
    IF NOT dlw.lease_held(v_file.status, v_file.assignment_token, v_file.lease_expires_at,
                          p_assignment_token, v_now) THEN
        RETURN QUERY SELECT 'LEASE_LOST'::text, v_status;
        RETURN;
    END IF;

    IF v_file.sha256 IS NOT NULL AND v_sha IS DISTINCT FROM v_file.sha256 THEN
        -- Not what the manifest promised: the file fails (finally: the source serves other
        -- content than declared) and nothing is counted.
        v_status := dlw.executor_fail_final(v_tenant, p_file_id,
            format('sha256 mismatch: expected %s, got %s', v_file.sha256, coalesce(v_sha, 'none')));
        RETURN QUERY SELECT 'SHA256_MISMATCH'::text, v_status;
        RETURN;
    END IF;

    UPDATE dlw.task_files f
       SET status = 'succeeded', bytes_done = p_bytes, lease_expires_at = NULL, error = NULL
     WHERE f.tenant_id = v_tenant AND f.id = p_file_id;
    INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id, occurred_at)
    VALUES (v_tenant, 'bytes_month', p_bytes, 'file:' || p_file_id, v_task, p_file_id, now())
    ON CONFLICT (tenant_id, event_key) DO NOTHING;

    IF v_status = 'running' AND NOT EXISTS (
        SELECT 1 FROM dlw.task_files f
         WHERE f.tenant_id = v_tenant AND f.task_id = v_task AND f.status <> 'succeeded'
    ) THEN
        UPDATE dlw.tasks x SET status = 'succeeded', error = NULL WHERE x.tenant_id = v_tenant AND x.id = v_task;
        INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
        VALUES (v_tenant, dlw.ctx_user_id(), 'task.succeeded', v_task::text,
                jsonb_build_object('bytes', (SELECT sum(f.bytes_done) FROM dlw.task_files f
                                              WHERE f.tenant_id = v_tenant AND f.task_id = v_task)));
        v_status := 'succeeded';
    END IF;
    RETURN QUERY SELECT 'completed'::text, v_status;
END
$$;
COMMENT ON FUNCTION dlw.executor_complete(uuid, uuid, bigint, text) IS
$c$The holder of a live lease reports the file downloaded: p_bytes actually downloaded, p_sha256 of the content. In one transaction the file becomes succeeded and a usage event (bytes_month, p_bytes, event_key file:<id>) is appended; the task succeeds (task.succeeded audit row) when all its files have.
Returns (outcome, task_status): completed | already_completed (the same token reported a success before: same answer, counted once) | SHA256_MISMATCH (the manifest names another sha256: the file and its task fail, nothing is counted) | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor's scope).
Raises 42501 without an executor context; 22023 for bytes < 0.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_fail(
    p_file_id uuid, p_assignment_token uuid, p_error text, p_retryable boolean, p_max_attempts integer DEFAULT 5
)
RETURNS TABLE (outcome text, task_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope  bigint := dlw.executor_scope();
    v_now    timestamptz := clock_timestamp();
    v_tenant bigint;
    v_task   uuid;
    v_status text;
    v_file   record;
    v_error  text := left(coalesce(nullif(p_error, ''), 'failed'), 2000);
BEGIN
    SELECT f.tenant_id, f.task_id INTO v_tenant, v_task
      FROM dlw.task_files f
     WHERE f.id = p_file_id AND (v_scope IS NULL OR f.tenant_id = v_scope);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'NOT_FOUND'::text, NULL::text;
        RETURN;
    END IF;
    SELECT x.status INTO v_status FROM dlw.tasks x WHERE x.tenant_id = v_tenant AND x.id = v_task FOR UPDATE;
    SELECT f.status, f.assignment_token, f.lease_expires_at, f.attempts INTO v_file
      FROM dlw.task_files f
     WHERE f.tenant_id = v_tenant AND f.id = p_file_id
       FOR UPDATE;
    IF NOT dlw.lease_held(v_file.status, v_file.assignment_token, v_file.lease_expires_at,
                          p_assignment_token, v_now) THEN
        RETURN QUERY SELECT 'LEASE_LOST'::text, v_status;
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) AND v_file.attempts < coalesce(p_max_attempts, 5) THEN
        UPDATE dlw.task_files f
           SET status = 'pending', assignment_token = NULL, lease_expires_at = NULL, lease_seconds = NULL,
               bytes_done = 0, error = v_error
         WHERE f.tenant_id = v_tenant AND f.id = p_file_id;
        RETURN QUERY SELECT 'requeued'::text, v_status;
        RETURN;
    END IF;
    IF coalesce(p_retryable, false) THEN
        v_error := format('%s (attempt %s of %s)', v_error, v_file.attempts, coalesce(p_max_attempts, 5));
    END IF;
    RETURN QUERY SELECT 'failed'::text, dlw.executor_fail_final(v_tenant, p_file_id, v_error);
END
$$;
COMMENT ON FUNCTION dlw.executor_fail(uuid, uuid, text, boolean, integer) IS
$c$The holder of a live lease reports a failure. Retryable while attempts < p_max_attempts: the file returns to the queue (pending, token cleared). Otherwise it fails finally: the task fails (task.failed audit row) and its other unfinished files are cancelled, losing their leases.
Returns (outcome, task_status): requeued | failed | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor's scope). Raises 42501 without an executor context.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_release(p_file_id uuid, p_assignment_token uuid)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_scope bigint := dlw.executor_scope();
    v_now   timestamptz := clock_timestamp();
    v_file  record;
BEGIN
    -- Only the file changes, so only the file is locked.
    SELECT f.tenant_id, f.id, f.status, f.assignment_token, f.lease_expires_at INTO v_file
      FROM dlw.task_files f
     WHERE f.id = p_file_id AND (v_scope IS NULL OR f.tenant_id = v_scope)
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'NOT_FOUND';
    END IF;
    IF NOT dlw.lease_held(v_file.status, v_file.assignment_token, v_file.lease_expires_at,
                          p_assignment_token, v_now) THEN
        RETURN 'LEASE_LOST';
    END IF;
    UPDATE dlw.task_files f
       SET status = 'pending', assignment_token = NULL, lease_expires_at = NULL, lease_seconds = NULL,
           bytes_done = 0, attempts = greatest(f.attempts - 1, 0), error = NULL
     WHERE f.tenant_id = v_file.tenant_id AND f.id = v_file.id;
    RETURN 'released';
END
$$;
COMMENT ON FUNCTION dlw.executor_release(uuid, uuid) IS
    'The holder of a live lease gives the file back untouched (an executor shutting down): it returns to the queue at once and the claim does not count as an attempt. Returns released | LEASE_LOST (nothing changes) | NOT_FOUND. Raises 42501 without an executor context.';

SET ROLE dlw_owner;

-- ---------------------------------------------------------------------------------------
-- Privileges: the API role calls the definer functions; the helpers run only inside them.
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION dlw.lease_held(text, uuid, timestamptz, uuid, timestamptz),
    dlw.executor_scope(), dlw.executor_fail_final(bigint, uuid, text),
    dlw.executor_requeue_expired(bigint, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lease_held(text, uuid, timestamptz, uuid, timestamptz),
    dlw.executor_scope(), dlw.executor_fail_final(bigint, uuid, text),
    dlw.executor_requeue_expired(bigint, integer, integer) TO dlw_system;

SET ROLE dlw_system;
REVOKE ALL ON FUNCTION dlw.executor_claim(integer, integer, text, integer),
    dlw.executor_heartbeat(uuid, uuid, bigint), dlw.executor_complete(uuid, uuid, bigint, text),
    dlw.executor_fail(uuid, uuid, text, boolean, integer), dlw.executor_release(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.executor_claim(integer, integer, text, integer),
    dlw.executor_heartbeat(uuid, uuid, bigint), dlw.executor_complete(uuid, uuid, bigint, text),
    dlw.executor_fail(uuid, uuid, text, boolean, integer), dlw.executor_release(uuid, uuid) TO dlw_app;
SET ROLE dlw_owner;

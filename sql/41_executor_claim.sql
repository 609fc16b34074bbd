-- owner: dlw_system
-- Executors: the claim. See sql/40_executor_helpers.sql for leases, rollup and lock order.

-- ---------------------------------------------------------------------------------------
-- The executor API, claims (SECURITY DEFINER, owned by dlw_system)
-- ---------------------------------------------------------------------------------------

-- Dropped first: its row grew (issue 14: repo_type, commit, hub_token; issue 17: resume_bytes,
-- resume_sha256; issue 15: storage_root, storage_layout, stored_path), which CREATE OR REPLACE cannot do;
-- the grant below is re-applied on every migrate.
DROP FUNCTION IF EXISTS dlw.executor_claim(integer, integer, text, integer);
CREATE FUNCTION dlw.executor_claim(
    p_max_files integer,
    p_lease_seconds integer,
    p_executor text DEFAULT NULL,
    p_max_attempts integer DEFAULT 5  -- dlw.domain_facts().default_max_attempts (a default must be a literal here)
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
    lease_expires_at timestamptz,
    repo_type text,
    "commit" text,
    hub_token bytea,
    resume_bytes bigint,
    resume_sha256 text,
    storage_root text,
    storage_layout text,
    stored_path text
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- Every statement here (and in the sweep and the queue fold it calls) reads through an index
-- whatever its parameters, and the fixed shapes are what the plan tests pin. With the default
-- (auto), some statements were planned again on every call with their values, and planning
-- them costs more the larger the tables. A 1-file claim, side by side: 1.2 ms at 10k pending /
-- 10k in flight and 2.5 ms at 1M / 1M replanned, 1.0 ms and 1.2 ms with the cached generic
-- plans: the planning was what issue 16's "at most 2x" for 1 file missed (bench/scale_claims.py).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_scope    bigint;
    v_now      timestamptz;
    v_executor text;
    v_tenants  bigint[];
    v_files    uuid[];
    v_tasks    uuid[];
BEGIN
    -- 0. The shared claim prologue (sql/38_work_leases.sql): the executor's scope (42501
    --    first), the limits (22023), then the expired leases in this scope return to the queue
    --    (or fail, out of attempts); only expired leases are read. Then the queue summary takes
    --    in the changes committed since the last fold and this sweep's own (unless another claim
    --    is folding right now: never a wait; see sql/39_executor_queue.sql).
    SELECT c.scope, c.executor INTO v_scope, v_executor
      FROM dlw.lease_claim_check('dlw.executor_claim', 'max_files', p_max_files, p_lease_seconds, p_max_attempts,
                                 p_executor) c;
    PERFORM dlw.lease_sweep_file(v_scope, p_max_attempts, 500);
    v_now := clock_timestamp();
    PERFORM dlw.executor_queue_try_fold();

    -- 1. Fair shares, without locks, from the queue summary (dlw.executor_queue): a file's turn
    --    is its tenant's files in flight + its rank among the tenant's pending files, so the
    --    tenant with the fewest leases is served first and one busy tenant cannot starve the
    --    others (max-min fairness; ties go to the tenant served least recently, then the lowest
    --    id). Only the first p_max_files tenants in (in flight, last served) order can get a
    --    turn among the first p_max_files (each of them has a first turn no later than any
    --    tenant after them), so the claim reads that many entries of executor_queue_rank,
    --    whatever the number of tenants with pending files or of leases in flight. A
    --    tenant-limited executor serves its own tenant only.
    -- 2. Each chosen tenant's share is then locked with SKIP LOCKED (a concurrent claimer
    --    gets other files; this claim may return fewer than its share, never waits).
    WITH candidates AS (
        SELECT q.tenant_id, q.pending, q.in_flight, q.served_at
          FROM dlw.executor_queue q
         WHERE v_scope IS NULL AND q.folded AND q.pending > 0
           -- Not a tenant whose pending files all back off (the summary counts them as pending):
           -- two probes of task_files_not_before, whatever the number of files backing off.
           AND (EXISTS (SELECT 1 FROM dlw.task_files f
                         WHERE f.tenant_id = q.tenant_id AND f.status = 'pending' AND f.not_before IS NULL)
                OR EXISTS (SELECT 1 FROM dlw.task_files f
                            WHERE f.tenant_id = q.tenant_id AND f.status = 'pending' AND f.not_before <= v_now))
         ORDER BY dlw.cross_tenant_key(q.in_flight), dlw.cross_tenant_key(q.served_at) NULLS FIRST,
                  dlw.cross_tenant_key(q.tenant_id)
         LIMIT p_max_files
    ), levelled AS (
        -- The water level: with N candidates, every one of them has a turn at most
        -- max(in flight) + ceil(p_max_files / N), so when the candidates' pending files reach that
        -- level p_max_files times, the first p_max_files turns all lie at or below it and no
        -- tenant needs more ranks than up to it (otherwise: up to p_max_files each, as always).
        -- The same turns are chosen; while the candidates' in-flight counts are close (the
        -- common case: the queue serves the least served first), from about p_max_files rows
        -- instead of up to N x p_max_files.
        SELECT l.tenant_id, l.in_flight, l.served_at,
               CASE WHEN sum(least(l.pending, l.level - l.in_flight)) OVER () >= p_max_files
                    THEN least(l.pending, l.level - l.in_flight, p_max_files)
                    ELSE least(l.pending, p_max_files) END AS ranks
          FROM (SELECT c.*, max(c.in_flight) OVER () + (p_max_files + count(*) OVER () - 1) / count(*) OVER () AS level
                  FROM candidates c) l
    ), chosen AS (
        SELECT c.tenant_id
          FROM levelled c
         CROSS JOIN LATERAL generate_series(1, c.ranks::integer) AS g(rank)
         ORDER BY c.in_flight + g.rank, c.served_at NULLS FIRST, c.tenant_id
         LIMIT p_max_files
    ), shares AS (
        SELECT c.tenant_id, count(*) AS n FROM chosen c GROUP BY c.tenant_id
        UNION ALL
        SELECT v_scope, p_max_files WHERE v_scope IS NOT NULL
    )
    SELECT array_agg(l.tenant_id), array_agg(l.id), array_agg(l.task_id)
      INTO v_tenants, v_files, v_tasks
      FROM shares s
     CROSS JOIN LATERAL (
           SELECT f.tenant_id, f.id, f.task_id
             FROM dlw.task_files f
            WHERE f.tenant_id = s.tenant_id AND f.status = 'pending'
              AND (f.not_before IS NULL OR f.not_before <= v_now)
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
           -- Not while a deletion of the same repository in the same target is being carried
           -- out (sql/44_executor_deletions.sql): nothing is written where it removes. The file
           -- stays pending for a later claim; one probe of the tenant's deletions in flight.
           AND NOT EXISTS (SELECT 1 FROM dlw.task_deletions d
                             JOIN dlw.tasks y ON y.tenant_id = d.tenant_id AND y.id = d.task_id
                            WHERE d.tenant_id = x.tenant_id AND d.status = 'assigned'
                              AND y.storage_target_id = x.storage_target_id AND y.repo_id = x.repo_id)
    ), assigned AS (
        UPDATE dlw.task_files f
           SET status = 'assigned',
               assignment_token = gen_random_uuid(),
               lease_seconds = p_lease_seconds,
               lease_expires_at = v_now + make_interval(secs => p_lease_seconds),
               attempts = f.attempts + 1,
               executor_id = v_executor,
               bytes_done = 0,
               error = NULL,
               not_before = NULL
          FROM mine m
         WHERE f.tenant_id = m.tenant_id AND f.id = m.id
        RETURNING f.tenant_id, f.id, f.task_id, f.path, f.size, f.sha256, f.priority, f.attempts,
                  f.assignment_token, f.lease_seconds, f.lease_expires_at, f.resume_bytes, f.resume_sha256
    )
    SELECT a.id, a.task_id, a.tenant_id, t.slug, x.repo_id, x.revision, a.path, a.size, a.sha256, a.priority,
           a.attempts, a.assignment_token, a.lease_seconds, a.lease_expires_at, x.repo_type, x."commit",
           h.ciphertext, a.resume_bytes, a.resume_sha256,
           st.config ->> 'root', coalesce(st.config ->> 'layout', 'tree'),
           (SELECT b.path FROM dlw.stored_blobs b
             WHERE b.tenant_id = a.tenant_id AND b.target_id = x.storage_target_id AND b.sha256 = a.sha256)
      FROM assigned a
      JOIN dlw.tasks x ON x.tenant_id = a.tenant_id AND x.id = a.task_id
      JOIN dlw.tenants t ON t.tenant_id = a.tenant_id
      JOIN dlw.storage_targets st ON st.tenant_id = x.tenant_id AND st.id = x.storage_target_id
      LEFT JOIN dlw.hub_tokens h ON h.tenant_id = a.tenant_id
     ORDER BY a.priority DESC, a.tenant_id, a.path;
END
$$;
COMMENT ON FUNCTION dlw.executor_claim(integer, integer, text, integer) IS
$c$Claims up to p_max_files files for the acting executor (context role executor; its tenant, or every tenant for tenant 0) under a lease of p_lease_seconds, after returning expired leases of its scope to the queue (a file out of its p_max_attempts fails, with its task).
Fair across tenants (the tenant with the fewest files in flight first, so one busy tenant starves nobody; ranked from the queue summary dlw.executor_queue, so the cost follows the files returned, not the tenants or the leases in flight), priority order (then oldest) within a tenant, skipping files that back off after a retryable failure (not_before in the future, set by dlw.executor_fail), whichever executor asks; files locked with FOR UPDATE SKIP LOCKED, so concurrent claims get disjoint files and never wait. Each file gets a fresh assignment_token (gen_random_uuid()), attempts + 1, status assigned; the first claim of a task moves it to running.
Returns one row per claimed file (possibly none), with the task's repo_type and resolved commit (what to download), the file's tenant's hub token as stored (ciphertext, NULL when none; only ever for a file this claim assigned) and the file's resume point (resume_bytes, resume_sha256: the last checkpoint of an earlier attempt, 0/NULL for none). p_executor is an instance label recorded in task_files.executor_id after the token subject.
Raises 42501 without an executor context; 22023 for max_files outside 1..claim_max_files (100), lease_seconds outside lease_seconds_min..lease_seconds_max (5..3600; see dlw.domain_facts()), max_attempts < 1.
Where each file goes (issue 15): its task's storage target's storage_root (config root; NULL = the executor's default tree) and storage_layout (tree or hf-cache, dlw.storage_layouts()). stored_path: when the file's declared sha256 is already stored in that target (dlw.stored_blobs, same tenant and target only), the path of the verified copy relative to the target's base directory, to place the file from (a hard link) instead of downloading it; NULL otherwise.$c$;

REVOKE ALL ON FUNCTION dlw.executor_claim(integer, integer, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.executor_claim(integer, integer, text, integer) TO dlw_app;

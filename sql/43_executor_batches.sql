-- owner: dlw_system
-- Executors: many reports in one transaction (small files: one request per file would cost more
-- than the file). Completions are set-based (dlw.executor_complete_set: a few statements for the
-- whole batch, whatever its size); dlw.executor_complete is a batch of one, so a file completes
-- the same way alone or in a batch. Heartbeats are each the single-file report.

CREATE OR REPLACE FUNCTION dlw.executor_complete_set(p_completions jsonb)
RETURNS TABLE (file_id uuid, outcome text, task_status text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_scope    bigint := dlw.executor_scope();  -- 42501 without an executor context
    v_ids      uuid[];
    v_tokens   uuid[];
    v_bytes    bigint[];
    v_shas     text[];
    v_paths    text[];
    v_tenants  bigint[];
    v_tasks    uuid[];
    v_outcomes text[];
    v_errors   text[];
    v_rest     jsonb;
    i          integer;
    r          record;
BEGIN
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_completions) e(item)
                WHERE (e.item ->> 'bytes') IS NULL OR (e.item ->> 'bytes')::bigint < 0) THEN
        RAISE EXCEPTION 'dlw.executor_complete: bytes must be >= 0' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_completions) e(item)
                WHERE NOT dlw.hex_digits_ok(lower(e.item ->> 'sha256'), 64)) THEN
        RAISE EXCEPTION 'dlw.executor_complete: sha256 must be 64 hex digits' USING ERRCODE = '22023';
    END IF;
    -- Where the executor put the file (deduplication, sql/23_stored_blobs.sql): the shape
    -- task_files.stored_path accepts, by the constraint's own rule (dlw.stored_path_ok,
    -- migrations/0032), so a bad path is the caller's 22023, not a constraint violation.
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_completions) e(item)
                WHERE NOT dlw.stored_path_ok(e.item ->> 'stored_path')) THEN
        RAISE EXCEPTION 'dlw.executor_complete: stored_path must be a relative, normalized path' USING ERRCODE = '22023';
    END IF;

    -- 1. The items, each file found in the executor's scope (NULL tenant: not found). A file
    --    reported twice in one batch is handled once here and again after (step 7), as two
    --    reports in a row are: the second is already_completed or LEASE_LOST.
    WITH items AS (
        SELECT e.item, e.n, (e.item ->> 'file_id')::uuid AS id,
               row_number() OVER (PARTITION BY (e.item ->> 'file_id')::uuid ORDER BY e.n) AS occurrence
          FROM jsonb_array_elements(p_completions) WITH ORDINALITY AS e(item, n)
    )
    SELECT array_agg(i.id ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg((i.item ->> 'assignment_token')::uuid ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg((i.item ->> 'bytes')::bigint ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg(lower(i.item ->> 'sha256') ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg(i.item ->> 'stored_path' ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg(l.tenant_id ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           array_agg(l.task_id ORDER BY i.n) FILTER (WHERE i.occurrence = 1),
           jsonb_agg(i.item ORDER BY i.n) FILTER (WHERE i.occurrence > 1)
      INTO v_ids, v_tokens, v_bytes, v_shas, v_paths, v_tenants, v_tasks, v_rest
      FROM items i
      LEFT JOIN LATERAL (
            -- A system-wide executor: the file by id across tenants (task_files_id_cross_tenant).
            SELECT f.tenant_id, f.task_id FROM dlw.task_files f
             WHERE v_scope IS NULL AND dlw.cross_tenant_key(f.id) = dlw.cross_tenant_key(i.id) AND f.id = i.id
            UNION ALL
            SELECT f.tenant_id, f.task_id FROM dlw.task_files f WHERE f.tenant_id = v_scope AND f.id = i.id
           ) l ON true;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- 2. Lock order (sql/40_executor_helpers.sql): every task of the batch, then its files, each
    --    in key order, so two batches over the same tasks never wait for each other in a cycle.
    --    The task locks serialise the reports that may finish a task: the rollup (step 6) sees
    --    every other file of it.
    PERFORM 1 FROM dlw.tasks x
     WHERE (x.tenant_id, x.id) IN (SELECT u.t, u.k FROM unnest(v_tenants, v_tasks) AS u(t, k) WHERE u.t IS NOT NULL)
     ORDER BY x.tenant_id, x.id
       FOR UPDATE;
    PERFORM 1 FROM dlw.task_files f
     WHERE (f.tenant_id, f.id) IN (SELECT u.t, u.f FROM unnest(v_tenants, v_ids) AS u(t, f) WHERE u.t IS NOT NULL)
     ORDER BY f.tenant_id, f.id
       FOR UPDATE;

    -- 3. Each item judged on its locked file, in the single report's order of checks: the same
    --    success again (a retry after a lost answer), the lease (dlw.lease_held, per file), the
    --    manifest's sha256, the declared size (the only amount ever counted).
    SELECT array_agg(j.outcome ORDER BY j.n), array_agg(j.error ORDER BY j.n)
      INTO v_outcomes, v_errors
      FROM (SELECT u.n,
                   CASE WHEN f.id IS NULL THEN 'NOT_FOUND'
                        WHEN f.status = 'succeeded' AND u.token IS NOT NULL AND f.assignment_token = u.token
                            THEN 'already_completed'
                        WHEN NOT dlw.lease_held(f.status, f.assignment_token, f.lease_expires_at, u.token, clock_timestamp())
                            THEN 'LEASE_LOST'
                        WHEN f.sha256 IS NOT NULL AND u.sha IS DISTINCT FROM f.sha256 THEN 'SHA256_MISMATCH'
                        WHEN u.bytes <> f.size THEN 'SIZE_MISMATCH'
                        ELSE 'completed' END AS outcome,
                   CASE WHEN f.sha256 IS NOT NULL AND u.sha IS DISTINCT FROM f.sha256
                            THEN format('sha256 mismatch: expected %s, got %s', f.sha256, coalesce(u.sha, 'none'))
                        WHEN u.bytes <> f.size
                            THEN format('size mismatch: declared %s bytes, reported %s', f.size, u.bytes) END AS error
              FROM unnest(v_ids, v_tokens, v_bytes, v_shas, v_tenants) WITH ORDINALITY AS u(id, token, bytes, sha, t, n)
              LEFT JOIN dlw.task_files f ON f.tenant_id = u.t AND f.id = u.id) j;

    -- 4. The downloaded (or placed) files succeed in one statement (one change row for the queue
    --    summary, whatever the batch size), recording where they lie and which content they use,
    --    each with its usage event (the declared size, event_key file:<id>: a repeated report
    --    counts once; bytes_month counts it whether the bytes came from the hub or from a copy
    --    already in the target, docs/storage.md "Deduplication"), in the same transaction.
    WITH done AS (
        UPDATE dlw.task_files f
           SET status = 'succeeded', bytes_done = f.size, lease_expires_at = NULL, error = NULL,
               resume_bytes = 0, resume_sha256 = NULL, stored_path = u.path, blob_sha256 = u.sha
          FROM unnest(v_tenants, v_ids, v_outcomes, v_shas, v_paths) AS u(t, id, o, sha, path)
         WHERE u.o = 'completed' AND f.tenant_id = u.t AND f.id = u.id
        RETURNING f.tenant_id, f.id, f.task_id, f.size
    )
    INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id, occurred_at)
    SELECT d.tenant_id, 'bytes_month', d.size, 'file:' || d.id, d.task_id, d.id, now()
      FROM done d
     ORDER BY d.tenant_id, d.id
        ON CONFLICT (tenant_id, event_key) DO NOTHING;
    --    Their contents are now stored in their tasks' targets: registered once per target in one
    --    statement (dlw.storage_record_set: storage counts each content once, later files of it
    --    are placed from this copy; it takes the registry rows in (tenant, target, sha256) order,
    --    so two batches registering the same contents never wait for each other in a cycle).
    PERFORM dlw.storage_record_set(array_agg(u.t), array_agg(x.storage_target_id), array_agg(u.sha),
                                   array_agg(f.size), array_agg(u.path))
       FROM unnest(v_tenants, v_ids, v_tasks, v_outcomes, v_shas, v_paths) AS u(t, id, k, o, sha, path)
       JOIN dlw.tasks x ON x.tenant_id = u.t AND x.id = u.k
       JOIN dlw.task_files f ON f.tenant_id = u.t AND f.id = u.id
      WHERE u.o = 'completed' AND u.sha IS NOT NULL
     HAVING count(*) > 0;

    -- 5. Not what the manifest promised (other content, or another size): the file fails finally
    --    with its task, nothing is counted. After step 4, so files of the batch that did arrive
    --    stay succeeded (as ever: succeeded files stay succeeded). A file an earlier failure of
    --    this batch already cancelled has lost its lease.
    FOR i IN SELECT u.n FROM unnest(v_tenants, v_ids, v_outcomes) WITH ORDINALITY AS u(t, id, o, n)
              WHERE u.o IN ('SHA256_MISMATCH', 'SIZE_MISMATCH') ORDER BY u.t, u.id
    LOOP
        IF EXISTS (SELECT 1 FROM dlw.task_files f
                    WHERE f.tenant_id = v_tenants[i] AND f.id = v_ids[i] AND f.status IN ('assigned', 'running')) THEN
            PERFORM dlw.executor_fail_final(v_tenants[i], v_ids[i], v_errors[i]);
        ELSE
            v_outcomes[i] := 'LEASE_LOST';
        END IF;
    END LOOP;

    -- 6. Rollup, once per task of the batch: a running task whose files have all succeeded
    --    succeeds (task.succeeded audit row with the bytes downloaded).
    FOR r IN SELECT DISTINCT u.t, u.k FROM unnest(v_tenants, v_tasks, v_outcomes) AS u(t, k, o)
              WHERE u.o = 'completed' ORDER BY u.t, u.k
    LOOP
        UPDATE dlw.tasks x SET status = 'succeeded', error = NULL
         WHERE x.tenant_id = r.t AND x.id = r.k AND x.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM dlw.task_files f
                            WHERE f.tenant_id = r.t AND f.task_id = r.k AND f.status <> 'succeeded');
        IF FOUND THEN
            PERFORM dlw.audit_append(r.t, dlw.ctx_user_id(), 'task.succeeded', r.k::text,
                jsonb_build_object('bytes', (SELECT sum(f.bytes_done) FROM dlw.task_files f
                                              WHERE f.tenant_id = r.t AND f.task_id = r.k)));
        END IF;
    END LOOP;

    RETURN QUERY
    SELECT u.id, u.o, x.status
      FROM unnest(v_ids, v_outcomes, v_tenants, v_tasks) WITH ORDINALITY AS u(id, o, t, k, n)
      LEFT JOIN dlw.tasks x ON x.tenant_id = u.t AND x.id = u.k
     ORDER BY u.n;

    -- 7. Files reported more than once in this batch: their later reports, as a batch again.
    IF v_rest IS NOT NULL THEN
        RETURN QUERY SELECT * FROM dlw.executor_complete_set(v_rest);
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.executor_complete_set(jsonb) IS
$c$Internal (dlw_system, inside dlw.executor_complete and dlw.executor_report_batch; 42501 without an executor context): completes an array of {file_id, assignment_token, bytes, sha256, stored_path?} set-based. Locks the batch's tasks, then its files (key order); judges each item as a single completion (already_completed, LEASE_LOST per file's lease, SHA256_MISMATCH, SIZE_MISMATCH, completed); moves the completed files to succeeded in one UPDATE (stored_path and blob_sha256 recorded) with one usage row each (bytes_month, the declared size, event_key file:<id>) in one INSERT, and registers their contents in their targets in one statement (dlw.storage_record_set, (tenant, target, sha256) order); then fails the mismatching files with their tasks (dlw.executor_fail_final; files of the batch already succeeded stay succeeded); then rolls up each task once (succeeded when all its files are; task.succeeded audit row).
Returns one row per item, in the order given (a file given again: after the others): (file_id, outcome, task_status: the task's status after the batch; NULL for NOT_FOUND). Raises 22023 for a missing or negative bytes, a sha256 that is not 64 hex digits, a stored_path that is not relative and normalized.$c$;
REVOKE ALL ON FUNCTION dlw.executor_complete_set(jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dlw.executor_report_batch(p_completions jsonb, p_heartbeats jsonb)
RETURNS TABLE (file_id uuid, action text, outcome text, task_status text, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_completions jsonb := coalesce(p_completions, '[]'::jsonb);
    v_heartbeats  jsonb := coalesce(p_heartbeats, '[]'::jsonb);
    v_max         integer;
    r             record;
    v             record;
BEGIN
    PERFORM dlw.executor_scope();  -- 42501 without an executor context, before the arguments
    SELECT f.claim_max_files INTO v_max FROM dlw.domain_facts() f;
    IF jsonb_typeof(v_completions) IS DISTINCT FROM 'array' OR jsonb_typeof(v_heartbeats) IS DISTINCT FROM 'array'
       OR jsonb_array_length(v_completions) + jsonb_array_length(v_heartbeats) > v_max THEN
        RAISE EXCEPTION 'dlw.executor_report_batch: two arrays of at most % reports in all', v_max
            USING ERRCODE = '22023';
    END IF;
    -- Completions first, as one set (tasks before files, in key order), then heartbeats (files
    -- only, in key order).
    RETURN QUERY
    SELECT c.file_id, 'complete'::text, c.outcome, c.task_status, NULL::timestamptz
      FROM dlw.executor_complete_set(v_completions) c;
    FOR r IN
        SELECT x.file_id, x.assignment_token, x.bytes_done, x.checkpoint_bytes, x.checkpoint_sha256
          FROM jsonb_to_recordset(v_heartbeats)
               AS x(file_id uuid, assignment_token uuid, bytes_done bigint, checkpoint_bytes bigint, checkpoint_sha256 text)
         ORDER BY x.file_id
    LOOP
        SELECT * INTO v FROM dlw.executor_heartbeat(
            r.file_id, r.assignment_token, r.bytes_done, r.checkpoint_bytes, r.checkpoint_sha256);
        RETURN QUERY SELECT r.file_id, 'heartbeat'::text, v.outcome, NULL::text, v.lease_expires_at;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dlw.executor_report_batch(jsonb, jsonb) IS
$c$Many reports of the acting executor in one transaction: p_completions, an array of {file_id, assignment_token, bytes, sha256, stored_path?} completed as one set (dlw.executor_complete_set: each item judged as dlw.executor_complete judges one), then p_heartbeats, an array of {file_id, assignment_token, bytes_done, checkpoint_bytes, checkpoint_sha256} handled as dlw.executor_heartbeat. At most claim_max_files (100) items in all.
Returns one row per item (file_id, action complete|heartbeat, outcome, and task_status (the task's status after the completions) or lease_expires_at as the single report returns them; a refused item changes nothing, the others still apply). Raises 42501 without an executor context, 22023 for anything but two arrays within the limit or a completion without bytes >= 0.$c$;

REVOKE ALL ON FUNCTION dlw.executor_report_batch(jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.executor_report_batch(jsonb, jsonb) TO dlw_app;

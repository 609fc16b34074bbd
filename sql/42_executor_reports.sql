-- owner: dlw_system
-- Executors: the reports of a lease holder (heartbeat, complete, fail, release). SECURITY
-- DEFINER, owned by dlw_system; see sql/40_executor_helpers.sql for leases, rollup and lock order.

-- Every report starts with the shared locked-item lookup, dlw.lease_lock_file
-- (sql/38_work_leases.sql). It replaced dlw.executor_locked_file.
DROP FUNCTION IF EXISTS dlw.executor_locked_file(uuid, uuid, boolean);

-- The checkpoint of a partial download (see migrations/0022): recorded by heartbeats and
-- releases, handed to the next claim. Internal; the caller holds the file row.
CREATE OR REPLACE FUNCTION dlw.record_checkpoint(p_tenant_id bigint, p_file_id uuid, p_bytes bigint, p_sha256 text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_bytes IS NULL AND p_sha256 IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_bytes IS NULL OR p_sha256 IS NULL OR p_bytes < 0 OR NOT dlw.hex_digits_ok(p_sha256, 64)
       OR p_bytes > (SELECT f.size FROM dlw.task_files f WHERE f.tenant_id = p_tenant_id AND f.id = p_file_id) THEN
        RETURN 'BAD_CHECKPOINT';
    END IF;
    UPDATE dlw.task_files f
       SET resume_bytes = p_bytes, resume_sha256 = CASE WHEN p_bytes = 0 THEN NULL ELSE p_sha256 END
     WHERE f.tenant_id = p_tenant_id AND f.id = p_file_id;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.record_checkpoint(bigint, uuid, bigint, text) IS
    'Internal (caller holds the file row): records a partial download''s checkpoint (the first p_bytes bytes, synced, have sha256 p_sha256) as the file''s resume point. Both NULL: nothing to record (NULL). Returns BAD_CHECKPOINT, changing nothing, for one of them NULL, a negative count, a count beyond the declared size or a hash that is not 64 lowercase hex digits; else NULL.';
REVOKE ALL ON FUNCTION dlw.record_checkpoint(bigint, uuid, bigint, text) FROM PUBLIC;

-- Dropped first: heartbeats and releases gained the checkpoint arguments.
DROP FUNCTION IF EXISTS dlw.executor_heartbeat(uuid, uuid, bigint);
DROP FUNCTION IF EXISTS dlw.executor_release(uuid, uuid);
CREATE OR REPLACE FUNCTION dlw.executor_heartbeat(
    p_file_id uuid, p_assignment_token uuid, p_bytes_done bigint DEFAULT NULL,
    p_checkpoint_bytes bigint DEFAULT NULL, p_checkpoint_sha256 text DEFAULT NULL
)
RETURNS TABLE (outcome text, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_file    record;
    v_refusal text;
BEGIN
    -- Only the file changes (assigned -> running, the lease), so only the file is locked.
    SELECT * INTO v_file FROM dlw.lease_lock_file(p_file_id, p_assignment_token, false);
    IF v_file.refusal IS NOT NULL THEN
        RETURN QUERY SELECT v_file.refusal, NULL::timestamptz;
        RETURN;
    END IF;
    -- More progress than the file has is impossible: refused, and nothing changes (the lease is
    -- not extended). The executor decides what to do with its download (the reference one never
    -- reads past the declared size, and fails the file).
    IF p_bytes_done > (SELECT f.size FROM dlw.task_files f WHERE f.tenant_id = v_file.tenant_id AND f.id = p_file_id) THEN
        RETURN QUERY SELECT 'SIZE_MISMATCH'::text, NULL::timestamptz;
        RETURN;
    END IF;
    v_refusal := dlw.record_checkpoint(v_file.tenant_id, p_file_id, p_checkpoint_bytes, p_checkpoint_sha256);
    IF v_refusal IS NOT NULL THEN
        RETURN QUERY SELECT v_refusal, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE dlw.task_files f
       SET status = 'running',
           lease_expires_at = clock_timestamp() + make_interval(secs => f.lease_seconds),
           bytes_done = CASE WHEN p_bytes_done IS NULL THEN f.bytes_done ELSE greatest(p_bytes_done, 0) END
     WHERE f.tenant_id = v_file.tenant_id AND f.id = p_file_id
    RETURNING 'ok'::text, f.lease_expires_at;
END
$$;
COMMENT ON FUNCTION dlw.executor_heartbeat(uuid, uuid, bigint, bigint, text) IS
    'The holder of a live lease reports progress: the file becomes running, its lease is extended by its lease_seconds from now, bytes_done is recorded (NULL keeps it), and a checkpoint (p_checkpoint_bytes synced bytes with sha256 p_checkpoint_sha256; both NULL: none) becomes the file''s resume point. Returns (outcome, lease_expires_at): ok | SIZE_MISMATCH (bytes_done beyond the file''s declared size; nothing changes, the lease is not extended) | BAD_CHECKPOINT (see dlw.record_checkpoint; nothing changes) | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor''s scope). Raises 42501 without an executor context.';

-- Dropped first: it gained where the executor put the file (issue 15, deduplication).
DROP FUNCTION IF EXISTS dlw.executor_complete(uuid, uuid, bigint, text);
CREATE OR REPLACE FUNCTION dlw.executor_complete(
    p_file_id uuid, p_assignment_token uuid, p_bytes bigint, p_sha256 text, p_stored_path text DEFAULT NULL
)
RETURNS TABLE (outcome text, task_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM dlw.executor_scope();  -- 42501 without an executor context, before the arguments
    IF p_bytes IS NULL OR p_bytes < 0 THEN
        RAISE EXCEPTION 'dlw.executor_complete: bytes must be >= 0' USING ERRCODE = '22023';
    END IF;
    -- One completion is a batch of one: the same checks, writes and rollup as many
    -- (dlw.executor_complete_set, sql/43_executor_batches.sql).
    RETURN QUERY
    SELECT c.outcome, c.task_status
      FROM dlw.executor_complete_set(jsonb_build_array(jsonb_build_object(
               'file_id', p_file_id, 'assignment_token', p_assignment_token, 'bytes', p_bytes, 'sha256', p_sha256,
                'stored_path', p_stored_path))) c;
END
$$;
COMMENT ON FUNCTION dlw.executor_complete(uuid, uuid, bigint, text, text) IS
$c$The holder of a live lease reports the file downloaded (or placed from a copy the claim offered): p_bytes, which must be the file's declared size, p_sha256 of the content, p_stored_path where it lies relative to its target's base directory (NULL: not said). In one transaction the file becomes succeeded (stored_path and blob_sha256 recorded), its content is registered in the target (dlw.storage_record_set: counted for storage when new, a source for later copies when p_stored_path is given) and a usage event (bytes_month, the declared size, event_key file:<id>) is appended; the task succeeds (task.succeeded audit row) when all its files have.
Returns (outcome, task_status): completed | already_completed (the same token reported a success before: same answer, counted once) | SHA256_MISMATCH (the manifest names another sha256: the file and its task fail, nothing is counted) | SIZE_MISMATCH (p_bytes is not the declared size: the file and its task fail, nothing is counted; checked after the sha256) | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor's scope).
Raises 42501 without an executor context; 22023 for bytes < 0, a sha256 that is not 64 hex digits, a stored_path that is not relative and normalized (dlw.stored_path_ok).$c$;

-- Dropped first: it gained the hub's Retry-After (issue 17, backoff).
DROP FUNCTION IF EXISTS dlw.executor_fail(uuid, uuid, text, boolean, integer);
CREATE OR REPLACE FUNCTION dlw.executor_fail(
    p_file_id uuid, p_assignment_token uuid, p_error text, p_retryable boolean,
    p_max_attempts integer DEFAULT 5,  -- dlw.domain_facts().default_max_attempts
    p_retry_after_seconds integer DEFAULT NULL
)
RETURNS TABLE (outcome text, task_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF p_retry_after_seconds < 0 THEN
        RAISE EXCEPTION 'dlw.executor_fail: retry_after_seconds must be >= 0' USING ERRCODE = '22023';
    END IF;
    -- The shared failure report (sql/38_work_leases.sql): the file and its task locked, backoff
    -- or the final failure (dlw.executor_fail_final).
    RETURN QUERY
    SELECT l.outcome, l.task_status
      FROM dlw.lease_fail_file(p_file_id, p_assignment_token, p_error, p_retryable, p_max_attempts,
                               p_retry_after_seconds) l;
END
$$;
COMMENT ON FUNCTION dlw.executor_fail(uuid, uuid, text, boolean, integer, integer) IS
$c$The holder of a live lease reports a failure. Retryable while attempts < p_max_attempts: the file returns to the queue (pending, token cleared) and is not offered again before its not_before, now + dlw.retry_backoff(attempts, p_retry_after_seconds) (exponential backoff with jitter, at least the hub's Retry-After p_retry_after_seconds; NULL: none). Otherwise it fails finally: the task fails (task.failed audit row) and its other unfinished files are cancelled, losing their leases.
Returns (outcome, task_status): requeued | failed | LEASE_LOST (wrong or stale token, expired lease, file not assigned/running; nothing changes) | NOT_FOUND (no such file in the executor's scope). Raises 42501 without an executor context; 22023 for p_retry_after_seconds < 0.$c$;

CREATE OR REPLACE FUNCTION dlw.executor_release(
    p_file_id uuid, p_assignment_token uuid, p_checkpoint_bytes bigint DEFAULT NULL, p_checkpoint_sha256 text DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_file    record;
    v_refusal text;
BEGIN
    -- Only the file changes, so only the file is locked.
    SELECT * INTO v_file FROM dlw.lease_lock_file(p_file_id, p_assignment_token, false);
    IF v_file.refusal IS NOT NULL THEN
        RETURN v_file.refusal;
    END IF;
    v_refusal := dlw.record_checkpoint(v_file.tenant_id, p_file_id, p_checkpoint_bytes, p_checkpoint_sha256);
    IF v_refusal IS NOT NULL THEN
        RETURN v_refusal;
    END IF;
    PERFORM dlw.requeue_file(v_file.tenant_id, p_file_id, NULL, true);
    RETURN 'released';
END
$$;
COMMENT ON FUNCTION dlw.executor_release(uuid, uuid, bigint, text) IS
    'The holder of a live lease gives the file back untouched (an executor shutting down), with the checkpoint of its partial download if any (as for dlw.executor_heartbeat): it returns to the queue at once and the claim does not count as an attempt. Returns released | BAD_CHECKPOINT (nothing changes) | LEASE_LOST (nothing changes) | NOT_FOUND. Raises 42501 without an executor context.';

REVOKE ALL ON FUNCTION dlw.executor_heartbeat(uuid, uuid, bigint, bigint, text), dlw.executor_complete(uuid, uuid, bigint, text, text),
    dlw.executor_fail(uuid, uuid, text, boolean, integer, integer), dlw.executor_release(uuid, uuid, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.executor_heartbeat(uuid, uuid, bigint, bigint, text), dlw.executor_complete(uuid, uuid, bigint, text, text),
    dlw.executor_fail(uuid, uuid, text, boolean, integer, integer), dlw.executor_release(uuid, uuid, bigint, text) TO dlw_app;

-- owner: dlw_system
-- Executors: many reports in one transaction (small files: one request per file would cost more
-- than the file). Each item is exactly the single-file report (sql/42_executor_reports.sql).

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
    -- Completions first, by task (each locks its task before its file: one order for every
    -- batch, so two batches of the same tasks do not deadlock), then heartbeats (files only).
    FOR r IN
        SELECT x.file_id, x.assignment_token, x.bytes, x.sha256, x.stored_path
          FROM jsonb_to_recordset(v_completions)
               AS x(file_id uuid, assignment_token uuid, bytes bigint, sha256 text, stored_path text)
          LEFT JOIN dlw.task_files f
            ON dlw.cross_tenant_key(f.id) = dlw.cross_tenant_key(x.file_id) AND f.id = x.file_id
         ORDER BY f.tenant_id, f.task_id, x.file_id
    LOOP
        SELECT * INTO v FROM dlw.executor_complete(r.file_id, r.assignment_token, r.bytes, r.sha256, r.stored_path);
        RETURN QUERY SELECT r.file_id, 'complete'::text, v.outcome, v.task_status, NULL::timestamptz;
    END LOOP;
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
$c$Many reports of the acting executor in one transaction: p_completions, an array of {file_id, assignment_token, bytes, sha256, stored_path?} handled as dlw.executor_complete (in task order), then p_heartbeats, an array of {file_id, assignment_token, bytes_done, checkpoint_bytes, checkpoint_sha256} handled as dlw.executor_heartbeat. At most claim_max_files (100) items in all.
Returns one row per item (file_id, action complete|heartbeat, outcome and task_status or lease_expires_at as the single report returns them; a refused item changes nothing, the others still apply). Raises 42501 without an executor context, 22023 for anything but two arrays within the limit.$c$;

REVOKE ALL ON FUNCTION dlw.executor_report_batch(jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.executor_report_batch(jsonb, jsonb) TO dlw_app;

-- owner: dlw_owner
-- Tasks: quota admission (dlw.create_task, "insert-then-lock"), cancellation and the current
-- quota figures, with the one operation other files share: cancelling unfinished files. The
-- admission itself (the quota-row lock, the figures, dlw.admission_check) is in
-- sql/31_admission_check.sql.
--
-- Everything here is invoker rights: the API calls it as dlw_app inside a transaction whose
-- tenant context dlw.set_context() has set, so row-level security applies to every statement
-- (a viewer, or a caller without context, is refused by the policies themselves).
--
-- Lock order (for every writer of dlw.quota_snapshots, e.g. the snapshot refresher): lock a
-- tenant's rows in ascending (tenant_id, period) order, and never hold them while waiting for
-- something slow. Task admission (dlw.lock_tenant_quota_rows, sql/31_admission_check.sql)
-- locks the rows of the previous and the current month.

-- ---------------------------------------------------------------------------------------
-- Shared operations
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.cancel_unfinished_files(
    p_tenant_id bigint, p_task_id uuid, p_error text DEFAULT NULL, p_error_if_none text DEFAULT NULL,
    p_except_file uuid DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_files bigint;
BEGIN
    -- Clearing the token and lease invalidates every executor lease on these files.
    UPDATE dlw.task_files f
       SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL,
           error = coalesce(p_error, f.error, p_error_if_none)
     WHERE f.tenant_id = p_tenant_id
       AND (p_task_id IS NULL OR f.task_id = p_task_id)
       AND (p_except_file IS NULL OR f.id <> p_except_file)
       AND f.status IN ('pending', 'assigned', 'running');
    GET DIAGNOSTICS v_files = ROW_COUNT;
    RETURN v_files;
END
$$;
COMMENT ON FUNCTION dlw.cancel_unfinished_files(bigint, uuid, text, text, uuid) IS
    'Cancels the unfinished (pending, assigned, running) files of one task (p_task_id NULL = of every task of the tenant), except p_except_file, and drops their leases (token and expiry cleared). error becomes p_error, else keeps its value, else p_error_if_none. Returns how many files it cancelled. The caller holds the task row(s) or knows why it need not.';

-- ---------------------------------------------------------------------------------------
-- Task creation
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.idempotent_replay(
    p_tenant_id bigint, p_key text, p_request_hash bytea, OUT outcome text, OUT task_id uuid
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN k.request_hash = p_request_hash THEN 'existing' ELSE 'IDEMPOTENCY_CONFLICT' END,
           CASE WHEN k.request_hash = p_request_hash THEN k.task_id END
      FROM dlw.idempotency_keys k
     WHERE k.tenant_id = p_tenant_id AND k.key = p_key;
$$;
COMMENT ON FUNCTION dlw.idempotent_replay(bigint, text, bytea) IS
    'The answer of dlw.create_task to an idempotency key the tenant used before: existing with the first task (same request hash) or IDEMPOTENCY_CONFLICT (another hash); NULLs when the key is new (or NULL).';

-- Issue 14 added the repository kind and the resolved commit (the old signature is dropped).
DROP FUNCTION IF EXISTS dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer);
CREATE OR REPLACE FUNCTION dlw.create_task(
    p_project_id uuid,
    p_storage_target text,
    p_repo_id text,
    p_revision text,
    p_priority integer,
    p_files jsonb,
    p_idempotency_key text DEFAULT NULL,
    p_request_hash bytea DEFAULT NULL,
    p_lock_timeout_ms integer DEFAULT NULL,
    p_repo_type text DEFAULT 'model',
    p_commit text DEFAULT NULL,
    OUT outcome text,
    OUT task_id uuid,
    OUT metric text,
    OUT detail jsonb
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant       bigint := dlw.ctx_tenant_id();
    v_active       boolean;
    v_project      uuid;
    v_target       uuid;
    v_target_id    uuid;
    v_requested    bigint;
    v_file_count   integer;
    v_metric       text;
    v_detail       jsonb;
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.create_task: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN  -- before any work (dlw.admission_check)
        RAISE EXCEPTION 'dlw.create_task must run at READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    IF p_files IS NULL OR jsonb_typeof(p_files) <> 'array' THEN
        RAISE EXCEPTION 'dlw.create_task: files must be a JSON array' USING ERRCODE = '22023';
    END IF;
    IF p_idempotency_key IS NOT NULL AND p_request_hash IS NULL THEN
        RAISE EXCEPTION 'dlw.create_task: an idempotency key needs a request hash' USING ERRCODE = '22004';
    END IF;
    IF p_storage_target ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
        v_target_id := p_storage_target::uuid;
    END IF;

    -- 1. Before any lock: a previous result for this idempotency key (a committed key never
    --    changes: no UPDATE or DELETE grant, so this answer is final), then the tenant, the
    --    project and storage target (RLS hides every other tenant's: they read as unknown).
    SELECT * INTO outcome, task_id FROM dlw.idempotent_replay(v_tenant, p_idempotency_key, p_request_hash);
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT t.active,
           CASE WHEN p_project_id IS NULL
                THEN (SELECT p.id FROM dlw.projects p WHERE p.tenant_id = v_tenant AND p.is_default)
                ELSE (SELECT p.id FROM dlw.projects p WHERE p.tenant_id = v_tenant AND p.id = p_project_id)
           END,
           (SELECT s.id FROM dlw.storage_targets s
            WHERE s.tenant_id = v_tenant
              AND (s.id = v_target_id OR s.name = coalesce(p_storage_target, 'default'))
            ORDER BY s.id = v_target_id DESC NULLS LAST
            LIMIT 1)
      INTO v_active, v_project, v_target
      FROM dlw.tenants t
     WHERE t.tenant_id = v_tenant;
    IF NOT coalesce(v_active, false) THEN
        outcome := 'TENANT_INACTIVE';
        RETURN;
    END IF;
    IF v_project IS NULL THEN
        outcome := 'UNKNOWN_PROJECT';
        RETURN;
    END IF;
    IF v_target IS NULL THEN
        outcome := 'UNKNOWN_STORAGE_TARGET';
        RETURN;
    END IF;

    SELECT coalesce(sum((f ->> 'size')::bigint), 0), count(*)
      INTO v_requested, v_file_count
      FROM jsonb_array_elements(p_files) AS f;

    -- 2. Insert-then-lock, then every figure from a fresh snapshot (dlw.admission_check),
    --    the storage the files add (what the target does not hold yet) included.
    SELECT a.active, a.metric, a.detail INTO v_active, v_metric, v_detail
      FROM dlw.admission_check(v_tenant, p_lock_timeout_ms, v_requested, true, v_target, p_files, 'dlw.create_task') a;

    -- A concurrent call with the same key committed while this one waited.
    SELECT * INTO outcome, task_id FROM dlw.idempotent_replay(v_tenant, p_idempotency_key, p_request_hash);
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;

    -- Deactivated while this call waited for the lock (deactivation takes the same lock).
    IF NOT v_active THEN
        outcome := 'TENANT_INACTIVE';
        RETURN;
    END IF;

    -- 4. Refuse or admit. A refusal is counted on the audit trail as a repeat: one row per
    --    actor, metric and minute.
    metric := v_metric;
    detail := v_detail;
    IF metric IS NOT NULL THEN
        -- Keyed on the metric alone (the repo is only in the first occurrence's detail): a caller
        -- varying repo_id must not get a row per request.
        PERFORM dlw.audit_repeat('quota.exceeded', NULL, detail || jsonb_build_object('repo_id', p_repo_id));
        outcome := 'QUOTA_EXCEEDED';
        RETURN;
    END IF;

    WITH new_task AS (
        INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, priority,
                               file_count, total_bytes, created_by, repo_type, "commit")
        VALUES (v_tenant, v_project, v_target, p_repo_id, p_revision, coalesce(p_priority, 0),
                v_file_count, v_requested, dlw.ctx_user_id(), coalesce(p_repo_type, 'model'), p_commit)
        RETURNING id
    ), new_files AS (
        INSERT INTO dlw.task_files (tenant_id, task_id, path, size, sha256, priority)
        SELECT v_tenant, n.id, f.path, f.size, f.sha256, coalesce(p_priority, 0)
          FROM new_task n, jsonb_to_recordset(p_files) AS f(path text, size bigint, sha256 text)
    ), new_key AS (
        INSERT INTO dlw.idempotency_keys (tenant_id, key, request_hash, task_id)
        SELECT v_tenant, p_idempotency_key, p_request_hash, n.id
          FROM new_task n
         WHERE p_idempotency_key IS NOT NULL
    )
    SELECT n.id INTO task_id FROM new_task n;
    PERFORM dlw.audit_append(v_tenant, dlw.ctx_user_id(), 'task.created', task_id::text,
        jsonb_build_object('repo_id', p_repo_id, 'repo_type', coalesce(p_repo_type, 'model'), 'revision', p_revision,
                           'commit', p_commit, 'file_count', v_file_count,
                           'total_bytes', v_requested, 'idempotent', p_idempotency_key IS NOT NULL));
    outcome := 'created';
    -- What the caller needs to describe the new task without reading it back.
    detail := jsonb_build_object('project_id', v_project, 'storage_target_id', v_target, 'file_count', v_file_count,
                                 'total_bytes', v_requested, 'created_at', now());
END
$$;
COMMENT ON FUNCTION dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer, text, text) IS
$c$Creates a task for the current tenant with quota admission ("insert-then-lock"); call as dlw_app at READ COMMITTED after dlw.set_context(). Arguments: project (NULL = default project), storage target (id or name; NULL = "default"), repo, revision, priority, files (jsonb array of {path, size, sha256?}), idempotency key (NULL = none), request hash (required with a key), lock_timeout in ms (NULL = leave the setting alone), repo type (model | dataset), the 40-hex commit the revision resolved to on the hub (NULL = not resolved: executors download the revision).
Returns one row (outcome, task_id, metric, detail). outcome: created (detail {project_id, storage_target_id, file_count, total_bytes, created_at}) | existing (same key and hash: the first task) | IDEMPOTENCY_CONFLICT (same key, other hash) | QUOTA_EXCEEDED (metric concurrent_tasks, tasks_per_minute, bytes_month or storage_gb, checked in that order; detail {metric, limit, current, requested}, for bytes_month and storage_gb also reserved, for storage_gb also limit_bytes; the refusal is counted on the audit trail by dlw.audit_repeat and must be committed) | UNKNOWN_PROJECT | UNKNOWN_STORAGE_TARGET | TENANT_INACTIVE.
Rate check: tasks of the tenant created in the 60 s before now() (dlw.tasks_recent, cancelled ones included) + 1 > quota_tasks_per_minute refuses.
Bytes check: bytes used this UTC month (folded snapshot + unfolded usage events) + bytes reserved (dlw.bytes_reserved: the declared size of every pending, assigned or running file) + the new task's declared bytes > quota_bytes_month refuses.
Storage check: storage used (dlw.storage_used_bytes: distinct contents stored) + reserved (dlw.storage_reserved_bytes: live files whose content the target does not hold) + the task's new storage (dlw.storage_requested_bytes) > quota_storage_gb GB refuses. 0 = unlimited for every limit.
Raises: 55P03 lock timeout; 42501 no context or a role that may not write (RLS); 25000 not READ COMMITTED; 22023 files not an array; 22004 key without hash; 23505 duplicate file path; 23502/23514/22P02 malformed files.$c$;

-- ---------------------------------------------------------------------------------------
-- Cancellation
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.cancel_task(p_task_id uuid) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant bigint := dlw.ctx_tenant_id();
    v_status text;
    v_files  bigint;
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.cancel_task: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    -- FOR UPDATE also applies the UPDATE policies: a role that may not write sees nothing here.
    SELECT x.status INTO v_status
      FROM dlw.tasks x
     WHERE x.tenant_id = v_tenant AND x.id = p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM 1 FROM dlw.tasks x WHERE x.tenant_id = v_tenant AND x.id = p_task_id;
        IF FOUND THEN
            RAISE EXCEPTION 'dlw.cancel_task: role % may not cancel tasks', dlw.ctx_role() USING ERRCODE = '42501';
        END IF;
        RETURN 'NOT_FOUND';
    END IF;
    IF v_status NOT IN ('pending', 'running') THEN
        RETURN 'TASK_TERMINAL';
    END IF;

    UPDATE dlw.tasks x SET status = 'cancelled' WHERE x.tenant_id = v_tenant AND x.id = p_task_id;
    v_files := dlw.cancel_unfinished_files(v_tenant, p_task_id);
    PERFORM dlw.audit_append(v_tenant, dlw.ctx_user_id(), 'task.cancelled', p_task_id::text,
        jsonb_build_object('previous_status', v_status, 'files_cancelled', v_files));
    RETURN 'cancelled';
END
$$;
COMMENT ON FUNCTION dlw.cancel_task(uuid) IS
    'Cancels a pending or running task of the current tenant and its non-terminal files (clearing their assignment tokens and leases), with a task.cancelled audit row. Returns cancelled | NOT_FOUND (also for another tenant''s id) | TASK_TERMINAL. Raises 42501 without context or for a role that may not write.';

-- ---------------------------------------------------------------------------------------
-- Current quota
-- ---------------------------------------------------------------------------------------

-- Its row grows with new figures, which CREATE OR REPLACE cannot do: re-created (the API's
-- named query is its only caller).
DROP FUNCTION IF EXISTS dlw.quota_current();
CREATE FUNCTION dlw.quota_current()
RETURNS TABLE (
    tenant_id              bigint,
    period                 date,
    bytes_used_month       bigint,
    bytes_quota_month      bigint,
    storage_gb_used        bigint,
    storage_gb_quota       integer,
    concurrent_tasks       integer,
    concurrent_quota       integer,
    snapshot_refreshed_at  timestamptz,
    snapshot_age_seconds   double precision,
    bytes_reserved         bigint,
    tasks_last_minute      bigint,
    tasks_per_minute_quota integer,
    storage_targets        bigint,
    storage_targets_quota  integer,
    storage_bytes_used     bigint,
    storage_bytes_reserved bigint
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT t.tenant_id,
           m.period,
           dlw.bytes_used_month(t.tenant_id, m.period),
           t.quota_bytes_month,
           ceil(s_used.bytes / (SELECT f.storage_gb_bytes FROM dlw.domain_facts() f)::numeric)::bigint,
           t.quota_storage_gb,
           (SELECT count(*)::integer FROM dlw.tasks x
             WHERE x.tenant_id = t.tenant_id AND x.status IN ('pending', 'running')),
           t.quota_concurrent,
           s.refreshed_at,
           extract(epoch FROM now() - s.refreshed_at)::double precision,
           dlw.bytes_reserved(t.tenant_id),
           dlw.tasks_recent(t.tenant_id),
           t.quota_tasks_per_minute,
           (SELECT count(*) FROM dlw.storage_targets st WHERE st.tenant_id = t.tenant_id),
           t.quota_storage_targets,
           s_used.bytes,
           dlw.storage_reserved_bytes(t.tenant_id)
      FROM dlw.tenants t
     CROSS JOIN (SELECT dlw.month_start(now()) AS period) m
     CROSS JOIN LATERAL (SELECT dlw.storage_used_bytes(t.tenant_id) AS bytes) s_used
      LEFT JOIN dlw.snapshot_state s ON true
     WHERE t.tenant_id = dlw.ctx_tenant_id();
END
$$;
COMMENT ON FUNCTION dlw.quota_current() IS
    'Limits and exact usage of the current tenant (no row without context): bytes used this UTC month (folded snapshot + unfolded usage), bytes reserved by unfinished files (dlw.bytes_reserved; admission counts used + reserved), live (pending/running) tasks, tasks created in the last 60 s (dlw.tasks_recent), storage targets, limits (0 = unlimited), and when the usage fold last ran (snapshot_refreshed_at, age in seconds; NULL = never). Storage: storage_bytes_used = bytes of the distinct contents the tenant''s targets hold (dlw.storage_used_bytes, each content once per target however many files use it), storage_gb_used the same in GB (storage_gb_bytes of dlw.domain_facts(), rounded up), storage_bytes_reserved what live files may still add (dlw.storage_reserved_bytes; admission counts used + reserved against quota_storage_gb).';

-- ---------------------------------------------------------------------------------------
-- Privileges: the API role calls the entry points; the shared operations also run inside
-- the definer functions of dlw_system (executors, dlw_admin).
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION dlw.cancel_unfinished_files(bigint, uuid, text, text, uuid), dlw.idempotent_replay(bigint, text, bytea),
    dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer, text, text),
    dlw.cancel_task(uuid), dlw.quota_current() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.cancel_unfinished_files(bigint, uuid, text, text, uuid) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.idempotent_replay(bigint, text, bytea),
    dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer, text, text),
    dlw.cancel_task(uuid), dlw.quota_current() TO dlw_app;

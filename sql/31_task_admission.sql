-- owner: dlw_owner
-- Tasks: quota admission (dlw.create_task, "insert-then-lock"), cancellation and the current
-- quota figures, with the two operations other files share: locking a tenant's quota rows
-- and cancelling unfinished files.
--
-- Everything here is invoker rights: the API calls it as dlw_app inside a transaction whose
-- tenant context dlw.set_context() has set, so row-level security applies to every statement
-- (a viewer, or a caller without context, is refused by the policies themselves).
--
-- Lock order (for every writer of dlw.quota_snapshots, e.g. the snapshot refresher): lock a
-- tenant's rows in ascending (tenant_id, period) order, and never hold them while waiting for
-- something slow. Task admission locks the rows of the previous and the current month.

-- ---------------------------------------------------------------------------------------
-- Shared operations
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.lock_tenant_quota_rows(p_tenant_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_period      date := dlw.month_start(now());
    v_prev_period date := (dlw.month_start(now()) - interval '1 month')::date;
BEGIN
    -- Insert-or-lock, row by row in period order: the rows always exist to be locked, even for
    -- a tenant created a second ago (a concurrent first insert makes this one wait, then lock).
    -- The previous and the current month's rows: two callers whose transactions straddle a
    -- month boundary still share a row and serialise. One statement takes both (DO UPDATE ...
    -- WHERE false locks the existing row and changes nothing), so this month's row is never
    -- inserted before last month's is held: the fold, which takes them in the same order,
    -- cannot be waiting for one while holding the other (tests/sql/test_snapshot_lock_order.py).
    INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount)
    VALUES (p_tenant_id, v_prev_period, 'bytes_month', 0), (p_tenant_id, v_period, 'bytes_month', 0)
    ON CONFLICT (tenant_id, period, metric) DO UPDATE SET amount = q.amount WHERE false;
    PERFORM 1
       FROM dlw.quota_snapshots q
      WHERE q.tenant_id = p_tenant_id AND q.metric = 'bytes_month' AND q.period IN (v_prev_period, v_period)
      ORDER BY q.period
        FOR UPDATE;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION dlw.lock_tenant_quota_rows(bigint) IS
    'Serialises with task admission: creates (if missing) and locks FOR UPDATE the tenant''s bytes_month rows of dlw.quota_snapshots for the previous and the current UTC month, in period order. Returns false when no row could be locked (RLS hid them). Used by dlw.create_task and dlw.deactivate_tenant_in (the API''s and the DBA''s deactivation).';

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

CREATE OR REPLACE FUNCTION dlw.bytes_reserved(p_tenant_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- PL/pgSQL for a plan cached per session (admission path). The partial index
    -- task_files_tenant_unfinished holds exactly these rows (and their size): the cost follows
    -- the live files, not the tenant's history.
    RETURN (SELECT coalesce(sum(f.size), 0)::bigint
              FROM dlw.task_files f
             WHERE f.tenant_id = p_tenant_id AND f.status IN ('pending', 'assigned', 'running'));
END
$$;
COMMENT ON FUNCTION dlw.bytes_reserved(bigint) IS
    'Bytes a tenant''s admitted tasks may still download: the declared size of each of its files that is pending, assigned or running (a running file counts whole: a retry downloads it again). Succeeded files count as usage instead (same transaction), failed and cancelled ones not at all; cancelling or failing a task cancels its unfinished files. Row-level security applies: another tenant reads 0.';

CREATE OR REPLACE FUNCTION dlw.storage_reserved_bytes(p_tenant_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The live files (index task_files_tenant_unfinished), less those whose content is already
    -- stored in their task's target (they will be placed from it: no new storage), each new
    -- content once per target (a file without a sha256 by itself).
    RETURN (SELECT coalesce(sum(d.size), 0)::bigint
              FROM (SELECT DISTINCT ON (x.storage_target_id, coalesce(f.sha256, f.id::text)) f.size
                      FROM dlw.task_files f
                      JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id
                     WHERE f.tenant_id = p_tenant_id AND f.status IN ('pending', 'assigned', 'running')
                       AND NOT EXISTS (SELECT 1 FROM dlw.stored_blobs b
                                        WHERE b.tenant_id = f.tenant_id AND b.target_id = x.storage_target_id
                                          AND b.sha256 = f.sha256)
                     ORDER BY x.storage_target_id, coalesce(f.sha256, f.id::text), f.size DESC) d);
END
$$;
COMMENT ON FUNCTION dlw.storage_reserved_bytes(bigint) IS
    'Storage a tenant''s admitted tasks may still add: the declared size of each of its pending, assigned or running files whose content (declared sha256) is not already stored in its task''s target (dlw.stored_blobs; a file without a sha256 counts whole), each new content once per target however many live files have it. Row-level security applies: another tenant reads 0.';

CREATE OR REPLACE FUNCTION dlw.storage_requested_bytes(p_tenant_id bigint, p_target_id uuid, p_files jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Each distinct content once (a file without a sha256 by itself), less what the target holds.
    RETURN (SELECT coalesce(sum(d.size), 0)::bigint
              FROM (SELECT DISTINCT ON (coalesce(lower(f.sha256), 'path:' || f.path)) f.size
                      FROM jsonb_to_recordset(p_files) AS f(path text, size bigint, sha256 text)
                     WHERE f.sha256 IS NULL
                        OR NOT EXISTS (SELECT 1 FROM dlw.stored_blobs b
                                        WHERE b.tenant_id = p_tenant_id AND b.target_id = p_target_id
                                          AND b.sha256 = lower(f.sha256))
                     ORDER BY coalesce(lower(f.sha256), 'path:' || f.path), f.size DESC) d);
END
$$;
COMMENT ON FUNCTION dlw.storage_requested_bytes(bigint, uuid, jsonb) IS
    'Storage the files p_files (jsonb array of {path, size, sha256?}) would add to target p_target_id: the size of each distinct content (declared sha256; a file without one by itself) not already stored there (dlw.stored_blobs). What admission counts for a task''s storage. Row-level security applies.';

CREATE OR REPLACE FUNCTION dlw.tasks_recent(p_tenant_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A range of the index tasks_tenant_created: at most the rate limit's worth of rows.
    RETURN (SELECT count(*)
              FROM dlw.tasks x
             WHERE x.tenant_id = p_tenant_id AND x.created_at > now() - interval '1 minute');
END
$$;
COMMENT ON FUNCTION dlw.tasks_recent(bigint) IS
    'Tasks of a tenant created (created_at) in the 60 seconds before now(), whatever became of them since (a cancelled task still counts): what quota_tasks_per_minute limits. Row-level security applies.';

-- ---------------------------------------------------------------------------------------
-- Admission
-- ---------------------------------------------------------------------------------------

-- Dropped first: it gained the storage the task would add (issue 15).
DROP FUNCTION IF EXISTS dlw.admission_refusal(bigint, bigint, boolean);
CREATE OR REPLACE FUNCTION dlw.admission_refusal(
    p_tenant_id bigint, p_requested bigint, p_new_task boolean, p_target_id uuid, p_files jsonb,
    OUT active boolean, OUT metric text, OUT detail jsonb
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_limit_tasks   integer;
    v_limit_rate    integer;
    v_limit_bytes   bigint;
    v_limit_storage integer;
    v_gb            bigint := (SELECT f.storage_gb_bytes FROM dlw.domain_facts() f);
    v_live          bigint;
    v_recent        bigint;
    v_used          bigint;
    v_reserved      bigint;
    v_stored        bigint;
    v_s_reserved    bigint;
    v_s_requested   bigint;
BEGIN
    -- STABLE: one snapshot, the caller's (taken after it locked the quota rows). Exact figures,
    -- no caches (a file completing meanwhile is either still reserved or already used, never
    -- neither): live tasks; tasks created in the 60 s before now() (dlw.tasks_recent); bytes used
    -- this month and bytes reserved by unfinished files (dlw.bytes_reserved); storage used
    -- (dlw.storage_used_bytes) and still to come (dlw.storage_reserved_bytes).
    SELECT t.active, t.quota_concurrent, t.quota_tasks_per_minute, t.quota_bytes_month, t.quota_storage_gb,
           CASE WHEN t.quota_concurrent > 0 THEN
               (SELECT count(*) FROM dlw.tasks x
                 WHERE x.tenant_id = p_tenant_id AND x.status IN ('pending', 'running'))
           END,
           CASE WHEN p_new_task AND t.quota_tasks_per_minute > 0 THEN dlw.tasks_recent(p_tenant_id) END,
           CASE WHEN t.quota_bytes_month > 0 THEN dlw.bytes_used_month(p_tenant_id, dlw.month_start(now())) END,
           CASE WHEN t.quota_bytes_month > 0 THEN dlw.bytes_reserved(p_tenant_id) END,
           CASE WHEN t.quota_storage_gb > 0 THEN dlw.storage_used_bytes(p_tenant_id) END,
           CASE WHEN t.quota_storage_gb > 0 THEN dlw.storage_reserved_bytes(p_tenant_id) END,
           CASE WHEN t.quota_storage_gb > 0 THEN dlw.storage_requested_bytes(p_tenant_id, p_target_id, p_files) END
      INTO active, v_limit_tasks, v_limit_rate, v_limit_bytes, v_limit_storage, v_live, v_recent, v_used,
           v_reserved, v_stored, v_s_reserved, v_s_requested
      FROM dlw.tenants t
     WHERE t.tenant_id = p_tenant_id;
    -- In the order of dlw.domain_facts().quota_metrics: concurrency, the rate (new tasks only),
    -- bytes this month, storage.
    IF v_limit_tasks > 0 AND v_live + 1 > v_limit_tasks THEN
        metric := 'concurrent_tasks';
        detail := jsonb_build_object('metric', metric, 'limit', v_limit_tasks, 'current', v_live, 'requested', 1);
    ELSIF p_new_task AND v_limit_rate > 0 AND v_recent + 1 > v_limit_rate THEN
        metric := 'tasks_per_minute';
        detail := jsonb_build_object('metric', metric, 'limit', v_limit_rate, 'current', v_recent, 'requested', 1);
    ELSIF v_limit_bytes > 0 AND v_used + v_reserved + p_requested > v_limit_bytes THEN
        metric := 'bytes_month';
        detail := jsonb_build_object('metric', metric, 'limit', v_limit_bytes, 'current', v_used,
                                     'reserved', v_reserved, 'requested', p_requested);
    ELSIF v_limit_storage > 0 AND v_stored + v_s_reserved + v_s_requested > v_limit_storage * v_gb THEN
        metric := 'storage_gb';
        detail := jsonb_build_object('metric', metric, 'limit', v_limit_storage, 'limit_bytes', v_limit_storage * v_gb,
                                     'current', v_stored, 'reserved', v_s_reserved,
                                     'requested', v_s_requested);
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.admission_refusal(bigint, bigint, boolean, uuid, jsonb) IS
    'Internal to admission (called by dlw.admission_check, which holds the tenant''s quota rows, at READ COMMITTED): whether the tenant is active, and the quota one more live task of p_requested declared bytes, with the files p_files ({path, size, sha256?}) in target p_target_id (storage: dlw.storage_requested_bytes), would exceed, in the order of dlw.domain_facts().quota_metrics: concurrent_tasks, tasks_per_minute (only when p_new_task: a created task, not a retried one), bytes_month, storage_gb (storage used + reserved + requested > quota_storage_gb * storage_gb_bytes); detail {metric, limit, current, requested}, for bytes_month and storage_gb also reserved (bytes), for storage_gb also limit_bytes (limit is in GB, the other figures in bytes); NULLs when admitted. Row-level security applies.';

CREATE OR REPLACE FUNCTION dlw.admission_check(
    p_tenant_id bigint, p_lock_timeout_ms integer, p_requested bigint, p_new_task boolean,
    p_target_id uuid, p_files jsonb, p_caller text,
    OUT active boolean, OUT metric text, OUT detail jsonb
)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lock_timeout text;
BEGIN
    -- The admission prologue of dlw.create_task and dlw.retry_task. The check must see rivals
    -- that committed while this call waited for the lock: only READ COMMITTED takes a fresh
    -- snapshot per statement.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% must run at READ COMMITTED, not %', p_caller, current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    -- Insert-then-lock (dlw.lock_tenant_quota_rows); lock_timeout bounds the wait (SQLSTATE
    -- 55P03) and is restored afterwards.
    IF p_lock_timeout_ms IS NOT NULL THEN
        v_lock_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    END IF;
    IF NOT dlw.lock_tenant_quota_rows(p_tenant_id) THEN
        RAISE EXCEPTION '%: quota row of tenant % not lockable', p_caller, p_tenant_id USING ERRCODE = '42501';
    END IF;
    IF p_lock_timeout_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;
    -- Under the lock, so the storage counter stays one row plus the changes since the last admission.
    PERFORM dlw.storage_usage_fold(p_tenant_id);
    -- A later statement, hence a fresh snapshot: every rival that committed before the lock was
    -- granted is visible (dlw.admission_refusal reads every figure from it).
    SELECT a.active, a.metric, a.detail INTO active, metric, detail
      FROM dlw.admission_refusal(p_tenant_id, p_requested, p_new_task, p_target_id, p_files) a;
END
$$;
COMMENT ON FUNCTION dlw.admission_check(bigint, integer, bigint, boolean, uuid, jsonb, text) IS
    'The admission shared by dlw.create_task and dlw.retry_task: refuses anything but READ COMMITTED (25000, naming p_caller), locks the tenant''s quota rows (dlw.lock_tenant_quota_rows; p_lock_timeout_ms bounds the wait, 55P03; 42501 when RLS hides them), folds the storage counter (dlw.storage_usage_fold), then returns dlw.admission_refusal for p_requested declared bytes, the files p_files in target p_target_id and p_new_task (active, metric, detail). The caller keeps the lock until it commits.';

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

REVOKE ALL ON FUNCTION dlw.lock_tenant_quota_rows(bigint), dlw.cancel_unfinished_files(bigint, uuid, text, text, uuid),
    dlw.admission_refusal(bigint, bigint, boolean, uuid, jsonb), dlw.admission_check(bigint, integer, bigint, boolean, uuid, jsonb, text),
    dlw.storage_reserved_bytes(bigint), dlw.storage_requested_bytes(bigint, uuid, jsonb),
    dlw.bytes_reserved(bigint), dlw.tasks_recent(bigint), dlw.idempotent_replay(bigint, text, bytea), dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer, text, text),
    dlw.cancel_task(uuid), dlw.quota_current() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lock_tenant_quota_rows(bigint), dlw.cancel_unfinished_files(bigint, uuid, text, text, uuid)
    TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.idempotent_replay(bigint, text, bytea), dlw.admission_refusal(bigint, bigint, boolean, uuid, jsonb),
    dlw.admission_check(bigint, integer, bigint, boolean, uuid, jsonb, text), dlw.storage_reserved_bytes(bigint),
    dlw.storage_requested_bytes(bigint, uuid, jsonb), dlw.bytes_reserved(bigint), dlw.tasks_recent(bigint),
    dlw.create_task(uuid, text, text, text, integer, jsonb, text, bytea, integer, text, text),
    dlw.cancel_task(uuid), dlw.quota_current() TO dlw_app;

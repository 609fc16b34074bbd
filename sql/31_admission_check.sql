-- owner: dlw_owner
-- Quota admission shared by dlw.create_task (sql/31_task_admission.sql) and dlw.retry_task
-- (sql/33_task_retry.sql): the quota-row lock, the exact figures admission counts (bytes and
-- storage reserved by live files, the storage a task would add, the tasks of the last minute)
-- and dlw.admission_check, which locks, reads them from a fresh snapshot and refuses or admits.
-- Sorted before sql/31_task_admission.sql, whose functions call these.
--
-- Everything here is invoker rights, called as dlw_app (or inside dlw_system's definer
-- functions) in the caller's tenant context: row-level security applies to every statement.
-- The lock order every writer of dlw.quota_snapshots keeps is described in
-- sql/31_task_admission.sql.

-- ---------------------------------------------------------------------------------------
-- The quota-row lock and the figures
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

-- ---------------------------------------------------------------------------------------
-- Privileges: the API role calls every function here; the quota-row lock also runs inside
-- the definer functions of dlw_system (the platform's and the DBA's deactivation of a tenant).
-- ---------------------------------------------------------------------------------------

REVOKE ALL ON FUNCTION dlw.lock_tenant_quota_rows(bigint), dlw.admission_refusal(bigint, bigint, boolean, uuid, jsonb),
    dlw.admission_check(bigint, integer, bigint, boolean, uuid, jsonb, text), dlw.storage_reserved_bytes(bigint),
    dlw.storage_requested_bytes(bigint, uuid, jsonb), dlw.bytes_reserved(bigint), dlw.tasks_recent(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.lock_tenant_quota_rows(bigint) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.admission_refusal(bigint, bigint, boolean, uuid, jsonb),
    dlw.admission_check(bigint, integer, bigint, boolean, uuid, jsonb, text), dlw.storage_reserved_bytes(bigint),
    dlw.storage_requested_bytes(bigint, uuid, jsonb), dlw.bytes_reserved(bigint), dlw.tasks_recent(bigint) TO dlw_app;

-- owner: dlw_owner
-- Tasks: the calendar helpers and the state machine (enforced by triggers, whoever writes).
-- Admission is in sql/31_admission_check.sql; task creation, cancellation and the current quota
-- figures are in sql/31_task_admission.sql.
--
-- Everything here is invoker rights: the API calls it as dlw_app inside a transaction whose
-- tenant context dlw.set_context() has set, so row-level security applies to every statement
-- (a viewer, or a caller without context, is refused by the policies themselves).
--
-- Clock. "This month" is always dlw.month_start(now()): the UTC calendar month of the
-- transaction's start time, from the server clock. There is deliberately no test clock
-- setting: dlw_app can set any custom setting (set_config is not privileged), so a clock
-- read from a setting would let an API client move itself into an empty month. Tests
-- exercise the month boundary through dlw.month_start() itself and by writing usage rows
-- just before and exactly at the start of the current UTC month.
--
-- Lock order (for every writer of dlw.quota_snapshots, e.g. the snapshot refresher): lock a
-- tenant's rows in ascending (tenant_id, period) order, and never hold them while waiting for
-- something slow. Task admission locks the rows of the previous and the current month.

-- ---------------------------------------------------------------------------------------
-- Calendar helpers
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw.month_start(p_at timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_trunc('month', p_at AT TIME ZONE 'UTC')::date $$;
COMMENT ON FUNCTION dlw.month_start(timestamptz) IS
    'First day of the UTC calendar month containing the instant p_at (independent of the session TimeZone). Quota periods and quota_snapshots.period use it.';

CREATE OR REPLACE FUNCTION dlw.bytes_used_month(p_tenant_id bigint, p_period date) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_cursor xid8;
BEGIN
    -- PL/pgSQL rather than SQL so the plans are cached per session (it is on the admission path).
    -- A STABLE function runs every statement on its caller's snapshot, so the cursor read first
    -- and the sums read next are consistent: a refresh that commits concurrently is seen either
    -- entirely or not at all. A missing cursor row counts every usage row as unfolded: it may
    -- over-count (refuse too early), never under-count (admit too much).
    --
    -- The cursor is read into a variable, not written as a subquery: under row-level security
    -- only leakproof conditions may be index conditions ahead of the policy, and PostgreSQL
    -- treats a COALESCE or a sub-select as possibly leaky, so `xid >= (sub-select)` was a
    -- filter over the tenant's whole history. `xid >= $var` is an index condition on
    -- usage_records_tenant_xid: only the unfolded rows are read (tests/sql/test_flat_plans.py).
    SELECT s.folded_below INTO v_cursor FROM dlw.snapshot_state s;
    v_cursor := coalesce(v_cursor, '0'::xid8);
    RETURN (coalesce((SELECT q.amount FROM dlw.quota_snapshots q
                      WHERE q.tenant_id = p_tenant_id AND q.period = p_period AND q.metric = 'bytes_month'), 0)
          + coalesce((SELECT sum(u.amount) FROM dlw.usage_records u
                      WHERE u.tenant_id = p_tenant_id
                        AND u.xid >= v_cursor
                        AND u.metric = 'bytes_month'
                        AND u.occurred_at >= (p_period::timestamp AT TIME ZONE 'UTC')
                        AND u.occurred_at < ((p_period + interval '1 month') AT TIME ZONE 'UTC')), 0)
           )::bigint;
END
$$;
COMMENT ON FUNCTION dlw.bytes_used_month(bigint, date) IS
    'Exact bytes a tenant used in the UTC month starting p_period: the folded amount in quota_snapshots plus the usage_records of that month not folded yet (xid >= snapshot_state.folded_below). Row-level security applies: another tenant reads 0.';

-- ---------------------------------------------------------------------------------------
-- State machine
-- ---------------------------------------------------------------------------------------
-- Tasks:  pending -> running | cancelled;  running -> succeeded | failed | cancelled;
--         failed -> pending (a retry, dlw.retry_task).
-- Files:  pending -> assigned | cancelled;  assigned -> pending | running | succeeded | failed | cancelled;
--         running -> pending | succeeded | failed | cancelled;
--         failed | cancelled -> pending only while the file's task is pending (a retried task's files).
-- Terminal: succeeded, failed, cancelled (a failed task, and the failed or cancelled files of a
-- task retried, can be re-queued; nothing else leaves a terminal status). An update that keeps
-- the status is always allowed.
-- Rows are inserted as pending. Violations raise SQLSTATE DLW01, for every role, superusers
-- included (only session_replication_role = replica skips triggers).

CREATE OR REPLACE FUNCTION dlw.check_status_change(p_kind text, p_from text, p_to text, p_detail text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT coalesce(CASE p_kind || ':' || p_from
                        WHEN 'task:pending'  THEN p_to IN ('running', 'cancelled')
                        WHEN 'task:running'  THEN p_to IN ('succeeded', 'failed', 'cancelled')
                        WHEN 'task:failed'   THEN p_to = 'pending'
                        WHEN 'file:pending'  THEN p_to IN ('assigned', 'cancelled')
                        WHEN 'file:assigned' THEN p_to IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')
                        WHEN 'file:running'  THEN p_to IN ('pending', 'succeeded', 'failed', 'cancelled')
                        ELSE false
                    END, false) THEN
        RAISE EXCEPTION 'illegal % transition: % -> %', p_kind, p_from, coalesce(p_to, 'NULL')
            USING ERRCODE = 'DLW01',
                  DETAIL = p_detail,
                  HINT = CASE p_kind
                      WHEN 'task' THEN 'legal: pending -> running | cancelled; running -> succeeded | failed | cancelled; failed -> pending'
                      ELSE 'legal: pending -> assigned | cancelled; assigned -> pending | running | succeeded | failed | cancelled; running -> pending | succeeded | failed | cancelled; failed | cancelled -> pending while the task is pending'
                  END;
    END IF;
    RETURN p_to IN ('succeeded', 'failed', 'cancelled');
END
$$;
COMMENT ON FUNCTION dlw.check_status_change(text, text, text, text) IS
    'The state machines of tasks and files (p_kind task or file): raises SQLSTATE DLW01 ("illegal <kind> transition: X -> Y", DETAIL p_detail, HINT the legal transitions) unless p_from -> p_to is legal; returns whether p_to is terminal. Called by the status guard triggers for a changed status (the file guard itself admits a retried task''s files: failed | cancelled -> pending while the task is pending).';

CREATE OR REPLACE FUNCTION dlw.task_status_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF dlw.check_status_change('task', OLD.status, NEW.status, format('task %s', OLD.id)) THEN
            NEW.finished_at := now();
        ELSE
            NEW.finished_at := NULL;  -- a retried task is not finished any more
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.task_status_guard() IS
    'BEFORE UPDATE trigger of dlw.tasks: refuses an illegal status change (SQLSTATE DLW01, "illegal task transition: X -> Y"), sets updated_at, and finished_at on entering a terminal status (cleared on leaving one: a retry).';

CREATE OR REPLACE FUNCTION dlw.task_file_status_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        -- A retried task's failed or cancelled files go back to the queue: legal only while their
        -- task is pending (dlw.retry_task moves it failed -> pending first; the task is read only
        -- for this rare transition).
        IF OLD.status IN ('failed', 'cancelled') AND NEW.status = 'pending' THEN
            IF NOT EXISTS (SELECT 1 FROM dlw.tasks x
                            WHERE x.tenant_id = OLD.tenant_id AND x.id = OLD.task_id AND x.status = 'pending') THEN
                PERFORM dlw.check_status_change('file', OLD.status, NEW.status,
                                                format('file %s of task %s (the task is not being retried)', OLD.id, OLD.task_id));
            END IF;
            NEW.finished_at := NULL;
        ELSIF dlw.check_status_change('file', OLD.status, NEW.status, format('file %s of task %s', OLD.id, OLD.task_id)) THEN
            NEW.finished_at := now();
        ELSE
            NEW.finished_at := NULL;
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.task_file_status_guard() IS
    'BEFORE UPDATE trigger of dlw.task_files: refuses an illegal status change (SQLSTATE DLW01, "illegal file transition: X -> Y"; failed | cancelled -> pending is legal while the file''s task is pending, a retry), sets updated_at, and finished_at on entering a terminal status (cleared on leaving one).';

CREATE OR REPLACE FUNCTION dlw.initial_status_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Fired only for rows whose status is not pending (see the triggers' WHEN clauses), so a
    -- normal insert never enters PL/pgSQL.
    RAISE EXCEPTION 'illegal % transition: (insert) -> %',
            CASE TG_TABLE_NAME WHEN 'tasks' THEN 'task' ELSE 'file' END, coalesce(NEW.status, 'NULL')
        USING ERRCODE = 'DLW01',
              HINT = 'tasks and files are inserted as pending';
END
$$;
COMMENT ON FUNCTION dlw.initial_status_guard() IS
    'BEFORE INSERT trigger of dlw.tasks and dlw.task_files, fired only when status is not pending: refuses the row (SQLSTATE DLW01).';

CREATE OR REPLACE TRIGGER tasks_status_guard
    BEFORE UPDATE ON dlw.tasks
    FOR EACH ROW EXECUTE FUNCTION dlw.task_status_guard();
CREATE OR REPLACE TRIGGER tasks_initial_status
    BEFORE INSERT ON dlw.tasks
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM 'pending') EXECUTE FUNCTION dlw.initial_status_guard();
CREATE OR REPLACE TRIGGER task_files_status_guard
    BEFORE UPDATE ON dlw.task_files
    FOR EACH ROW EXECUTE FUNCTION dlw.task_file_status_guard();
CREATE OR REPLACE TRIGGER task_files_initial_status
    BEFORE INSERT ON dlw.task_files
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM 'pending') EXECUTE FUNCTION dlw.initial_status_guard();
COMMENT ON TRIGGER tasks_status_guard ON dlw.tasks IS 'Task state machine: see dlw.task_status_guard()';
COMMENT ON TRIGGER tasks_initial_status ON dlw.tasks IS 'Tasks are inserted as pending: see dlw.initial_status_guard()';
COMMENT ON TRIGGER task_files_status_guard ON dlw.task_files IS 'File state machine: see dlw.task_file_status_guard()';
COMMENT ON TRIGGER task_files_initial_status ON dlw.task_files IS 'Files are inserted as pending: see dlw.initial_status_guard()';

REVOKE ALL ON FUNCTION dlw.month_start(timestamptz), dlw.bytes_used_month(bigint, date),
    dlw.check_status_change(text, text, text, text),
    dlw.task_status_guard(), dlw.task_file_status_guard(), dlw.initial_status_guard() FROM PUBLIC;
-- Trigger functions need no EXECUTE to fire; what they call does (the roles that write tasks).
GRANT EXECUTE ON FUNCTION dlw.month_start(timestamptz), dlw.bytes_used_month(bigint, date),
    dlw.check_status_change(text, text, text, text) TO dlw_app, dlw_system;

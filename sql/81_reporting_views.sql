-- owner: dlw_owner
-- The reporting schema: what BI tools (Metabase, Grafana) and analysts in psql read.
--
-- Every view is security_invoker: it runs with the privileges and the row-level security of
-- whoever queries it, so a reporting login sees exactly its own tenant's rows (the
-- reporting_select policies take the tenant from the login, dlw.reporting_tenant_id()), and
-- a login that is mapped to no tenant sees nothing. That is also why dlw_reporting holds
-- SELECT on the base columns these views read (migrations/0002.schema.sql): RLS, not hiding
-- the tables, keeps tenants apart. No view reads a secret column (task_files.assignment_token,
-- storage_targets.config, usage_records.xid, users, service_accounts, idempotency_keys).
--
-- Column names are an interface (dashboards depend on them): CREATE OR REPLACE VIEW refuses to
-- drop, rename or retype a column, so only new columns can be appended. Times are timestamptz;
-- "day" and "month" are UTC calendar dates, like the quota periods.

-- When the usage fold last ran comes from dlw.reporting_snapshot_refreshed_at()
-- (sql/80_reporting_refreshed_at.sql).

-- Each view's column comments are one object {column: comment}, applied by this helper, which
-- exists only while this file runs (it is dropped at the end). A view column left out, or a
-- column the view does not have, fails the migration.
CREATE OR REPLACE FUNCTION dlw.comment_view_columns(p_view regclass, p_comments jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_missing text;
    r         record;
BEGIN
    SELECT string_agg(a.attname, ', ' ORDER BY a.attnum) INTO v_missing
      FROM pg_attribute a
     WHERE a.attrelid = p_view AND a.attnum > 0 AND NOT a.attisdropped AND NOT p_comments ? a.attname;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION '%: no comment for column(s) %', p_view, v_missing;
    END IF;
    FOR r IN SELECT c.key, c.value FROM jsonb_each_text(p_comments) c LOOP
        EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', p_view, r.key, r.value);
    END LOOP;
END
$$;


-- ---------------------------------------------------------------------------------------
-- reporting.tasks
-- ---------------------------------------------------------------------------------------
-- File figures are correlated subqueries on the (tenant_id, task_id, path) key: a query that
-- does not select them does not compute them (the view is flattened into the query).
CREATE OR REPLACE VIEW reporting.tasks WITH (security_invoker = true) AS
SELECT t.tenant_id,
       t.id AS task_id,
       t.project_id,
       p.name AS project_name,
       t.storage_target_id,
       s.name AS storage_target_name,
       t.repo_id,
       t.revision,
       t.status,
       t.priority,
       t.file_count,
       t.total_bytes,
       (SELECT count(*) FROM dlw.task_files f
         WHERE f.tenant_id = t.tenant_id AND f.task_id = t.id AND f.status = 'succeeded') AS files_succeeded,
       (SELECT count(*) FROM dlw.task_files f
         WHERE f.tenant_id = t.tenant_id AND f.task_id = t.id AND f.status = 'failed') AS files_failed,
       (SELECT count(*) FROM dlw.task_files f
         WHERE f.tenant_id = t.tenant_id AND f.task_id = t.id
           AND f.status IN ('pending', 'assigned', 'running')) AS files_remaining,
       (SELECT coalesce(sum(f.bytes_done), 0)::bigint FROM dlw.task_files f
         WHERE f.tenant_id = t.tenant_id AND f.task_id = t.id) AS bytes_done,
       t.created_by,
       t.error,
       t.created_at,
       t.updated_at,
       t.finished_at,
       extract(epoch FROM t.finished_at - t.created_at)::double precision AS duration_seconds,
       t.repo_type,
       t."commit"
  FROM dlw.tasks t
  LEFT JOIN dlw.projects p ON p.tenant_id = t.tenant_id AND p.id = t.project_id
  LEFT JOIN dlw.storage_targets s ON s.tenant_id = t.tenant_id AND s.id = t.storage_target_id;

COMMENT ON VIEW reporting.tasks IS
    'One row per download task of your tenant: what was asked (repository, revision, files, declared bytes), where it goes, its status and its progress.';
SELECT dlw.comment_view_columns('reporting.tasks', jsonb_build_object(
    'tenant_id', 'Your tenant''s id (every row of every reporting view carries it)',
    'task_id', 'Task id (the id in the REST API: /api/v1/tasks/{task_id})',
    'project_id', 'Project the task belongs to',
    'project_name', 'Name of that project',
    'storage_target_id', 'Storage target the files are written to',
    'storage_target_name', 'Name of that storage target',
    'repo_id', 'Model repository requested, e.g. org/model',
    'revision', 'Revision requested (branch, tag or commit)',
    'status', 'pending, running, succeeded, failed or cancelled (the last three are final)',
    'priority', 'Scheduling priority; higher runs first',
    'file_count', 'Number of files in the task''s manifest',
    'total_bytes', 'Sum of the declared file sizes; what admission counted against the monthly byte quota',
    'files_succeeded', 'Files downloaded and verified',
    'files_failed', 'Files that failed for good',
    'files_remaining', 'Files not finished yet: pending, assigned to an executor, or running',
    'bytes_done', 'Bytes the executors reported as downloaded so far, over all files',
    'created_by', 'Who created the task: a user id or a service principal',
    'error', 'Why the task failed or was cancelled, when known',
    'created_at', 'When the task was admitted',
    'updated_at', 'Last change of the task row',
    'finished_at', 'When the task reached a final status; NULL while live',
    'duration_seconds', 'finished_at - created_at in seconds; NULL while live',
    'repo_type', 'Kind of hub repository: model or dataset',
    'commit', 'The 40-hex commit the revision resolved to when the task was created: what was downloaded (NULL: the hub could not be asked and the client''s manifest was taken as given)'));

-- ---------------------------------------------------------------------------------------
-- reporting.task_files
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW reporting.task_files WITH (security_invoker = true) AS
SELECT f.tenant_id,
       f.id AS file_id,
       f.task_id,
       f.path,
       f.size,
       f.sha256,
       f.status,
       f.priority,
       f.attempts,
       f.executor_id,
       f.bytes_done,
       f.error,
       f.lease_expires_at,
       f.created_at,
       f.updated_at,
       f.finished_at,
       f.lease_seconds
  FROM dlw.task_files f;

COMMENT ON VIEW reporting.task_files IS
    'One row per file of a task of your tenant: the unit executors claim, download and verify.';
SELECT dlw.comment_view_columns('reporting.task_files', jsonb_build_object(
    'tenant_id', 'Your tenant''s id',
    'file_id', 'File id',
    'task_id', 'Task the file belongs to (reporting.tasks.task_id)',
    'path', 'Path of the file inside the repository',
    'size', 'Declared size in bytes',
    'sha256', 'Declared SHA-256 (hex), when the manifest had one',
    'status', 'pending, assigned (claimed by an executor), running, succeeded, failed or cancelled',
    'priority', 'Scheduling priority (the task''s)',
    'attempts', 'How many times an executor claimed the file',
    'executor_id', 'Executor that holds or last held the file',
    'bytes_done', 'Bytes downloaded so far, as reported by the executor',
    'error', 'Last error reported for the file',
    'lease_expires_at', 'While assigned or running: when the executor''s lease runs out and the file returns to the queue',
    'created_at', 'When the file was queued (with its task)',
    'updated_at', 'Last change of the file row',
    'finished_at', 'When the file reached a final status',
    'lease_seconds', 'Length of the current executor lease in seconds (each heartbeat extends lease_expires_at by this much)'));

-- ---------------------------------------------------------------------------------------
-- reporting.usage_daily / reporting.usage_monthly
-- ---------------------------------------------------------------------------------------
-- From the append-only usage log (dlw.usage_records), the source of truth of the quota: each
-- completed file appends one event with the bytes actually downloaded.
CREATE OR REPLACE VIEW reporting.usage_daily WITH (security_invoker = true) AS
SELECT u.tenant_id,
       (u.occurred_at AT TIME ZONE 'UTC')::date AS day,
       u.metric,
       count(*) AS events,
       count(DISTINCT u.task_id) AS tasks,
       sum(u.amount)::bigint AS amount
  FROM dlw.usage_records u
 GROUP BY u.tenant_id, (u.occurred_at AT TIME ZONE 'UTC')::date, u.metric;

COMMENT ON VIEW reporting.usage_daily IS
    'Usage of your tenant per UTC day and metric, summed from the append-only usage log. Days without usage have no row.';
SELECT dlw.comment_view_columns('reporting.usage_daily', jsonb_build_object(
    'tenant_id', 'Your tenant''s id',
    'day', 'UTC calendar day the usage happened',
    'metric', 'What is measured: bytes_month = bytes downloaded (the metric of the monthly byte quota)',
    'events', 'Number of usage events (one per completed file)',
    'tasks', 'Number of distinct tasks those events belong to',
    'amount', 'Sum of the events'' amounts (bytes for bytes_month)'));

CREATE OR REPLACE VIEW reporting.usage_monthly WITH (security_invoker = true) AS
SELECT m.tenant_id,
       m.month,
       m.metric,
       m.events,
       m.tasks,
       m.amount,
       t.quota_bytes_month,
       CASE WHEN t.quota_bytes_month > 0 THEN round(100.0 * m.amount / t.quota_bytes_month, 2) END AS quota_used_pct
  FROM (SELECT u.tenant_id,
               date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date AS month,
               u.metric,
               count(*) AS events,
               count(DISTINCT u.task_id) AS tasks,
               sum(u.amount)::bigint AS amount
          FROM dlw.usage_records u
         GROUP BY u.tenant_id, date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date, u.metric) m
  JOIN dlw.tenants t ON t.tenant_id = m.tenant_id;

COMMENT ON VIEW reporting.usage_monthly IS
    'Usage of your tenant per UTC calendar month (the quota period) and metric, with the current monthly byte limit.';
SELECT dlw.comment_view_columns('reporting.usage_monthly', jsonb_build_object(
    'tenant_id', 'Your tenant''s id',
    'month', 'First day of the UTC calendar month',
    'metric', 'What is measured: bytes_month = bytes downloaded',
    'events', 'Number of usage events (one per completed file)',
    'tasks', 'Number of distinct tasks those events belong to',
    'amount', 'Sum of the events'' amounts (bytes for bytes_month)',
    'quota_bytes_month', 'The tenant''s monthly byte limit as it is now (not as it was in that month); 0 = unlimited',
    'quota_used_pct', 'amount as a percentage of quota_bytes_month; NULL when unlimited'));

-- ---------------------------------------------------------------------------------------
-- reporting.quota_status
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW reporting.quota_status WITH (security_invoker = true) AS
SELECT t.tenant_id,
       t.slug,
       t.display_name,
       t.active,
       m.period,
       u.bytes_used_month,
       t.quota_bytes_month,
       CASE WHEN t.quota_bytes_month > 0 THEN greatest(t.quota_bytes_month - u.bytes_used_month, 0) END
           AS bytes_remaining_month,
       CASE WHEN t.quota_bytes_month > 0 THEN round(100.0 * u.bytes_used_month / t.quota_bytes_month, 2) END
           AS bytes_used_pct,
       (SELECT count(*) FROM dlw.tasks x
         WHERE x.tenant_id = t.tenant_id AND x.status IN ('pending', 'running')) AS concurrent_tasks,
       t.quota_concurrent,
       t.quota_storage_gb,
       (SELECT q.amount FROM dlw.quota_snapshots q
         WHERE q.tenant_id = t.tenant_id AND q.period = m.period AND q.metric = 'bytes_month') AS snapshot_bytes_month,
       r.refreshed_at AS snapshot_refreshed_at,
       extract(epoch FROM now() - r.refreshed_at)::double precision AS snapshot_age_seconds,
       (SELECT coalesce(sum(f.size), 0)::bigint FROM dlw.task_files f
         WHERE f.tenant_id = t.tenant_id AND f.status IN ('pending', 'assigned', 'running')) AS bytes_reserved,
       (SELECT count(*) FROM dlw.tasks x
         WHERE x.tenant_id = t.tenant_id AND x.created_at > now() - interval '1 minute') AS tasks_last_minute,
       t.quota_tasks_per_minute,
       (SELECT count(*) FROM dlw.storage_targets s WHERE s.tenant_id = t.tenant_id) AS storage_targets,
       t.quota_storage_targets,
       -- the storage counter (sql/23_stored_blobs.sql): summary row plus unfolded changes
       (SELECT coalesce(sum(su.bytes), 0)::bigint FROM dlw.storage_usage su WHERE su.tenant_id = t.tenant_id)
           AS storage_bytes_used
  FROM dlw.tenants t
 CROSS JOIN LATERAL (SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date AS period) m
 CROSS JOIN LATERAL (SELECT coalesce(sum(x.amount), 0)::bigint AS bytes_used_month
                       FROM dlw.usage_records x
                      WHERE x.tenant_id = t.tenant_id AND x.metric = 'bytes_month'
                        AND x.occurred_at >= (m.period::timestamp AT TIME ZONE 'UTC')
                        AND x.occurred_at < ((m.period + interval '1 month') AT TIME ZONE 'UTC')) u
 CROSS JOIN LATERAL (SELECT dlw.reporting_snapshot_refreshed_at() AS refreshed_at) r;

COMMENT ON VIEW reporting.quota_status IS
    'One row: your tenant, its limits, its usage this UTC month and its live concurrency, as task admission checks them, and how fresh the usage snapshot is.';
SELECT dlw.comment_view_columns('reporting.quota_status', jsonb_build_object(
    'tenant_id', 'Your tenant''s id',
    'slug', 'Your tenant''s short name',
    'display_name', 'Your tenant''s display name',
    'active', 'false: the tenant is deactivated (no logins, no new tasks; data stays readable)',
    'period', 'Current quota period: first day of the current UTC month',
    'bytes_used_month', 'Bytes downloaded this UTC month (every usage event of the month, folded into the snapshot or not: the figure admission checks)',
    'quota_bytes_month', 'Monthly byte limit; 0 = unlimited. Admission refuses a task when bytes_used_month + bytes_reserved + its declared bytes would exceed it',
    'bytes_remaining_month', 'quota_bytes_month - bytes_used_month (not below 0); NULL when unlimited',
    'bytes_used_pct', 'bytes_used_month as a percentage of quota_bytes_month; NULL when unlimited',
    'concurrent_tasks', 'Live tasks now (pending or running)',
    'quota_concurrent', 'Limit on live tasks; 0 = unlimited',
    'quota_storage_gb', 'Storage allowance in GB (10^9 bytes); 0 = unlimited. Admission refuses a task when storage used + reserved + what its files add would exceed it',
    'snapshot_bytes_month', 'Bytes of this month already folded into the usage snapshot; NULL when no snapshot row exists yet',
    'snapshot_refreshed_at', 'When the usage fold (snapshot refresh) last ran, platform-wide; NULL = never',
    'snapshot_age_seconds', 'Seconds since snapshot_refreshed_at; NULL = never refreshed',
    'bytes_reserved', 'Declared bytes of your files still to download (pending, assigned or running): admitted, not yet used',
    'tasks_last_minute', 'Tasks created in the last 60 seconds, cancelled ones included',
    'quota_tasks_per_minute', 'Limit on tasks created in any 60 seconds; 0 = unlimited',
    'storage_targets', 'Storage targets you have',
    'quota_storage_targets', 'Limit on storage targets; 0 = unlimited',
    'storage_bytes_used', 'Bytes of the distinct contents your storage targets hold (each once per target, however many files use it)'));

-- ---------------------------------------------------------------------------------------
-- reporting.audit_log
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW reporting.audit_log WITH (security_invoker = true) AS
SELECT a.tenant_id,
       a.id AS audit_id,
       a.at,
       a.actor,
       a.action,
       a.target,
       a.detail,
       a.count,
       a.last_at
  FROM dlw.audit_log a;

COMMENT ON VIEW reporting.audit_log IS
    'Your tenant''s audit trail, append-only: logins and denied logins, permission denials, quota refusals, task creation and cancellation, and every administration action (including DBA support access).';
SELECT dlw.comment_view_columns('reporting.audit_log', jsonb_build_object(
    'tenant_id', 'Your tenant''s id',
    'audit_id', 'Entry id (time-ordered)',
    'at', 'When it happened',
    'actor', 'Who did it: a user id, oidc:<issuer>#<subject>, sa:<service account>, service:system-admin, or the database login of a DBA',
    'action', 'What happened, e.g. task.created, task.cancelled, quota.exceeded, auth.login, tenant.deactivated',
    'target', 'What it happened to (a task id, a user id, a login name, ...)',
    'detail', 'Details of the action as JSON (for a repeat row, of its first occurrence)',
    'count', 'How many times it happened: 1, or for a repeated permission_denied or quota.exceeded, the occurrences of one actor on one target (and metric) in the UTC minute of at',
    'last_at', 'For a repeat row, when it last happened; NULL for a single event'));

-- ---------------------------------------------------------------------------------------
-- Privileges: reporting logins read the views (and, through them, the granted base
-- columns); dlw_system reads them for dlw_admin.view_as_tenant. Nobody writes.
-- ---------------------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA reporting FROM PUBLIC;
GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO dlw_reporting, dlw_system;

-- The comments are applied: the helper goes (it is no part of the schema).
DROP FUNCTION dlw.comment_view_columns(regclass, jsonb);

-- Executors and the snapshot runner: the columns and indexes the claim/complete functions
-- (sql/40_executor.sql) and the usage fold (sql/50_snapshots.sql) need.

SET ROLE dlw_owner;

-- A lease's length, so a heartbeat extends it by as much as the claim granted.
ALTER TABLE dlw.task_files
    ADD COLUMN lease_seconds integer CHECK (lease_seconds > 0);
COMMENT ON COLUMN dlw.task_files.lease_seconds IS
    'Length of the current lease in seconds (set by the claim; every heartbeat extends lease_expires_at by this much)';
COMMENT ON COLUMN dlw.task_files.attempts IS
    'How many times the file was claimed; a retryable failure or an expired lease requeues it only while attempts < the retry limit';
COMMENT ON COLUMN dlw.task_files.executor_id IS
    'Executor holding (or that last held) the lease: <token subject>/<instance label>';
COMMENT ON COLUMN dlw.task_files.bytes_done IS
    'Bytes downloaded so far (heartbeats), or the bytes actually downloaded once succeeded';

-- Leases in flight, per tenant: the fair claim counts them and the expiry sweep scans them.
CREATE INDEX task_files_in_flight ON dlw.task_files (tenant_id, lease_expires_at)
    WHERE status IN ('assigned', 'running');

-- Which runner folds usage into quota_snapshots; written by `dlw migrate` (app/migrate.py),
-- read by the API at startup (a pg_cron job: the API runs no loop of its own).
ALTER TABLE dlw.snapshot_state
    ADD COLUMN runner text NOT NULL DEFAULT 'leader' CHECK (runner IN ('leader', 'pg_cron')),
    ADD COLUMN runner_detail text;
COMMENT ON COLUMN dlw.snapshot_state.runner IS
    'Who calls dlw.refresh_quota_snapshots() every minute: pg_cron (a cron job scheduled by dlw migrate) or leader (the API instance holding the leader advisory lock)';
COMMENT ON COLUMN dlw.snapshot_state.runner_detail IS
    'For pg_cron: the job name and the database that holds it; for leader: why pg_cron is not used';

GRANT SELECT (lease_seconds) ON dlw.task_files TO dlw_reporting;

RESET ROLE;

-- Backoff: a file that failed retryably waits before it is offered again. The wait is kept by
-- the server (sql/42_executor_reports.sql sets it, sql/41_executor_claim.sql honours it), so
-- every executor observes it, not just the one that saw the failure.

SET ROLE dlw_owner;

ALTER TABLE dlw.task_files
    ADD COLUMN not_before timestamptz
        CONSTRAINT task_files_not_before CHECK (not_before >= created_at);
COMMENT ON COLUMN dlw.task_files.not_before IS
    'Earliest time a claim may offer this pending file again (the backoff after a retryable failure: exponential with jitter, at least the hub''s Retry-After; see dlw.retry_backoff). NULL: at once. Cleared when the file is claimed';

-- The claim's probe for a tenant with a file ready (sql/41_executor_claim.sql): pending files by
-- tenant and backoff (NULL first: ready at once).
CREATE INDEX task_files_not_before ON dlw.task_files (tenant_id, not_before NULLS FIRST) WHERE status = 'pending';
COMMENT ON INDEX dlw.task_files_not_before IS
    'Pending files by tenant and not_before: the claim finds in two probes whether a tenant has a file that does not back off';

RESET ROLE;

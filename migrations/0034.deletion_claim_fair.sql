-- The system-wide deletion claim is fair across tenants (sql/44_executor_deletions.sql): it
-- finds the tenants with pending deletions through task_deletions_queue (tenant_id leading) and
-- no longer reads the pending deletions of every tenant oldest first. The cross-tenant index it
-- read is dropped: one index fewer to maintain per deletion, and one fewer that does not lead
-- with tenant_id (app/ops/catalog_check.py, INDEX_ALLOWLIST).

SET ROLE dlw_owner;

DROP INDEX dlw.task_deletions_pending_cross_tenant;

RESET ROLE;

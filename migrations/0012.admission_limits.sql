-- Admission limits that cannot be talked around (sql/31_task_admission.sql, sql/20_tenants.sql,
-- sql/91_dlw_admin_helpers.sql): a rate limit on task creation, a cap on a tenant's storage
-- targets, the index that makes the reserved bytes of live files cheap to sum, and repeat
-- counting on the audit trail so that a flood of denials or refusals adds O(1) rows.

SET ROLE dlw_owner;

-- Two more per-tenant limits; 0 = unlimited, like the others.
ALTER TABLE dlw.tenants
    ADD COLUMN quota_tasks_per_minute integer NOT NULL DEFAULT 120 CHECK (quota_tasks_per_minute >= 0),
    ADD COLUMN quota_storage_targets  integer NOT NULL DEFAULT 20  CHECK (quota_storage_targets >= 0);
COMMENT ON COLUMN dlw.tenants.quota_tasks_per_minute IS
    'Tasks the tenant may create in any 60 seconds (by created_at), cancelled ones included; 0 = unlimited';
COMMENT ON COLUMN dlw.tenants.quota_storage_targets IS
    'Storage targets the tenant may have (the default one included); 0 = unlimited';
COMMENT ON COLUMN dlw.tenants.quota_bytes_month IS
    'Bytes per UTC calendar month: a task is admitted while usage this month plus the declared bytes of every unfinished file (reserved) plus its own declared bytes stays within this; 0 = unlimited';

GRANT SELECT (quota_tasks_per_minute, quota_storage_targets) ON dlw.tenants TO dlw_reporting;

-- The bytes admission reserves: the declared size of each file still to download. Partial and
-- tenant-leading, so summing it reads the live files only (an index-only scan), not history.
CREATE INDEX task_files_tenant_unfinished ON dlw.task_files (tenant_id) INCLUDE (size)
    WHERE status IN ('pending', 'assigned', 'running');

-- Repeats. A repeated event (a permission denial, a quota refusal) of one actor on one route in
-- one UTC minute is one row whose count grows, written by dlw.audit_repeat. Single events keep
-- minute NULL and count 1, as before.
ALTER TABLE dlw.audit_log
    ADD COLUMN count   integer NOT NULL DEFAULT 1 CHECK (count >= 1),
    ADD COLUMN minute  timestamptz,
    ADD COLUMN last_at timestamptz;
COMMENT ON COLUMN dlw.audit_log.count IS
    'How many occurrences the row stands for: 1 for a single event; for a repeat row (minute set), how often it happened in that minute';
COMMENT ON COLUMN dlw.audit_log.minute IS
    'Repeat rows only: the UTC minute they count; NULL for a single event';
COMMENT ON COLUMN dlw.audit_log.last_at IS
    'Repeat rows only: when the latest occurrence happened (at is the first); NULL for a single event';
COMMENT ON COLUMN dlw.audit_log.at IS 'When it happened (for a repeat row: its first occurrence)';
-- The repeat key: tenant, minute, action, actor, target, and a quota refusal's metric.
CREATE UNIQUE INDEX audit_log_repeats ON dlw.audit_log
    (tenant_id, minute, action, (coalesce(actor, '')), (coalesce(target, '')), (coalesce(detail ->> 'metric', '')))
    WHERE minute IS NOT NULL;

-- dlw.audit_repeat (dlw_system) adds to a repeat row's count; nothing else may change a row.
GRANT UPDATE (count, last_at) ON dlw.audit_log TO dlw_system;

RESET ROLE;

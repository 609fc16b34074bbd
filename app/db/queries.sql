-- The API's SQL, one named block each (parsed by app/db/queries.py; asyncpg $n placeholders).
-- Tenant scoping is not written here: row-level security adds it to every query on a tenant table.

-- name: set_context
-- The first statement of every request transaction (transaction-local settings).
SELECT dlw.set_context($1, $2, $3);

-- name: audit
SELECT dlw.audit($1, $2, $3::jsonb);

-- name: audit_repeat
-- A repeatable event (a permission denial): counted on one row per actor, target and minute.
SELECT dlw.audit_repeat($1, $2, $3::jsonb);

-- name: role_safety
SELECT current_user AS name, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user;

-- name: schema_program
SELECT program_sha256, migrations FROM dlw.schema_program;

-- name: create_task
SELECT * FROM dlw.create_task($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11);

-- name: task_by_id
SELECT id, project_id, storage_target_id, repo_id, repo_type, revision, "commit", status, priority, file_count, total_bytes,
       created_by, error, created_at, updated_at, finished_at, deletion, deleted_at
FROM dlw.tasks WHERE id = $1;

-- name: task_files
SELECT id, path, size, sha256, status, attempts, bytes_done, error, finished_at
FROM dlw.task_files WHERE task_id = $1 ORDER BY path;

-- name: list_tasks
-- One text per filter shape (not `$n IS NULL OR ...`): each keeps a cheap generic plan on the
-- index (tenant_id, created_at DESC, id DESC), or with a status (tenant_id, status, created_at
-- DESC, id DESC). Parameters: limit, [status], [cursor at, id].
SELECT id, project_id, storage_target_id, repo_id, repo_type, revision, "commit", status, priority, file_count, total_bytes,
       created_by, error, created_at, updated_at, finished_at, deletion, deleted_at
FROM dlw.tasks ORDER BY created_at DESC, id DESC LIMIT $1;

-- name: list_tasks_by_status
SELECT id, project_id, storage_target_id, repo_id, repo_type, revision, "commit", status, priority, file_count, total_bytes,
       created_by, error, created_at, updated_at, finished_at, deletion, deleted_at
FROM dlw.tasks WHERE status = $2 ORDER BY created_at DESC, id DESC LIMIT $1;

-- name: list_tasks_after
SELECT id, project_id, storage_target_id, repo_id, repo_type, revision, "commit", status, priority, file_count, total_bytes,
       created_by, error, created_at, updated_at, finished_at, deletion, deleted_at
FROM dlw.tasks WHERE (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $1;

-- name: list_tasks_by_status_after
SELECT id, project_id, storage_target_id, repo_id, repo_type, revision, "commit", status, priority, file_count, total_bytes,
       created_by, error, created_at, updated_at, finished_at, deletion, deleted_at
FROM dlw.tasks WHERE status = $2 AND (created_at, id) < ($3, $4) ORDER BY created_at DESC, id DESC LIMIT $1;

-- name: cancel_task
SELECT dlw.cancel_task($1) AS outcome;

-- name: retry_task
SELECT * FROM dlw.retry_task($1, $2);

-- name: delete_task
SELECT * FROM dlw.delete_task($1);

-- name: task_deletion
-- GET /tasks/{id}: the task's deletion, when it has one (RLS: the tenant's own row only).
SELECT status, attempts, error, released_bytes, created_at AS requested_at, finished_at
FROM dlw.task_deletions WHERE task_id = $1;

-- name: quota_current
SELECT * FROM dlw.quota_current();

-- name: list_storage_targets
SELECT id, name, kind, created_at FROM dlw.storage_targets ORDER BY name;

-- name: insert_storage_target
INSERT INTO dlw.storage_targets (tenant_id, name, kind, config)
VALUES (dlw.ctx_tenant_id(), $1, $2, $3::jsonb)
RETURNING id, name, kind, created_at;

-- name: platform_create_tenant
SELECT * FROM dlw.platform_create_tenant($1, $2, $3, $4, $5);

-- name: platform_update_tenant
SELECT dlw.platform_update_tenant($1, $2, $3, $4, $5, $6);

-- name: tenant_by_id
SELECT tenant_id, slug, display_name, active, quota_concurrent, quota_bytes_month, quota_storage_gb,
       created_at, updated_at
FROM dlw.tenants WHERE tenant_id = $1;

-- name: list_tenants
SELECT tenant_id, slug, display_name, active, quota_concurrent, quota_bytes_month, quota_storage_gb,
       created_at, updated_at
FROM dlw.tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2;

-- name: list_users
SELECT id, email, role, issuer, subject, created_at, last_login_at
FROM dlw.users
WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
ORDER BY created_at DESC, id DESC LIMIT $3;

-- name: set_user_role
SELECT dlw.set_user_role($1, $2);

-- name: user_by_id
SELECT id, email, role, issuer, subject, created_at, last_login_at FROM dlw.users WHERE id = $1;

-- name: insert_service_account
INSERT INTO dlw.service_accounts (tenant_id, issuer, client_id, role, description)
VALUES (dlw.ctx_tenant_id(), $1, $2, $3, $4)
RETURNING id, issuer, client_id, role, description, created_at;

-- name: list_service_accounts
SELECT id, issuer, client_id, role, description, created_at FROM dlw.service_accounts ORDER BY created_at, id;

-- name: delete_service_account
DELETE FROM dlw.service_accounts WHERE id = $1 RETURNING client_id;

-- name: audit_trail
-- Two texts (without and with the action filter), not `$n IS NULL OR action = $n`: a generic
-- plan could not use audit_log_tenant_action_at for the OR. Parameters: cursor (at, id), [action], limit.
SELECT id, at, actor, action, target, detail, count, last_at FROM dlw.audit_log
WHERE tenant_id = dlw.ctx_tenant_id() AND ($1::timestamptz IS NULL OR (at, id) < ($1, $2))
ORDER BY at DESC, id DESC LIMIT $3;

-- name: audit_trail_by_action
SELECT id, at, actor, action, target, detail, count, last_at FROM dlw.audit_log
WHERE tenant_id = dlw.ctx_tenant_id() AND ($1::timestamptz IS NULL OR (at, id) < ($1, $2))
  AND action = $3
ORDER BY at DESC, id DESC LIMIT $4;

-- name: login_user
-- Outside any tenant context: the definer function decides the tenant.
SELECT * FROM dlw.login_user($1, $2, $3, $4, $5, $6);

-- name: executor_claim
SELECT * FROM dlw.executor_claim($1, $2, $3, $4);

-- name: executor_heartbeat
SELECT * FROM dlw.executor_heartbeat($1, $2, $3, $4, $5);

-- name: executor_report_batch
SELECT * FROM dlw.executor_report_batch($1::jsonb, $2::jsonb);

-- name: executor_complete
SELECT * FROM dlw.executor_complete($1, $2, $3, $4, $5);

-- name: executor_fail
SELECT * FROM dlw.executor_fail($1, $2, $3, $4, $5, $6);

-- name: executor_release
SELECT dlw.executor_release($1, $2, $3, $4) AS outcome;

-- name: executor_claim_deletions
SELECT * FROM dlw.executor_claim_deletions($1, $2, $3, $4);

-- name: executor_deletion_heartbeat
SELECT * FROM dlw.executor_deletion_heartbeat($1, $2);

-- name: executor_deletion_complete
SELECT * FROM dlw.executor_deletion_complete($1, $2);

-- name: executor_deletion_fail
SELECT dlw.executor_deletion_fail($1, $2, $3, $4, $5) AS outcome;

-- name: snapshot_runner
SELECT runner, runner_detail FROM dlw.snapshot_state;

-- The leader's lock, and with it a bound on how long its session may sit idle ($2, in ms): a
-- leader frozen with its socket open (SIGSTOP, a stuck event loop) is disconnected by the server
-- after that long, which releases the lock. The limits are set only when the lock was taken
-- (CASE evaluates in order), so a waiting instance may sleep between its tries.
-- name: try_leader_lock
SELECT CASE WHEN pg_try_advisory_lock($1)
            THEN set_config('idle_session_timeout', $2, false) IS NOT NULL
                 AND set_config('idle_in_transaction_session_timeout', $2, false) IS NOT NULL
            ELSE false END;

-- name: probe
SELECT 1;

-- name: executor_queue_notify
-- Wakes the claims waiting on every API instance (app/api/queue_wakeup.py), in a transaction of
-- its own after the work committed: one notification per tenant whose files became claimable.
SELECT pg_notify('dlw_executor_queue', t) FROM unnest($1::text[]) AS t;

-- name: session_keepalives
-- The leader's session: the server drops it when its client vanishes without closing the socket
-- (idle $1 s, then $3 probes $2 s apart). Set after connecting rather than as startup parameters:
-- a pooler in front (PgBouncer) refuses startup parameters it does not know.
SELECT set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $2, false),
       set_config('tcp_keepalives_count', $3, false);

-- name: pooler_probe
-- True when the startup parameter $1 = $2 did not arrive: a pooler dropped it (app/db/connect.py).
SELECT current_setting($1, true) IS DISTINCT FROM $2;

-- name: refresh_quota_snapshots
SELECT ran, events, tenants, periods, folded_below::text AS folded_below FROM dlw.refresh_quota_snapshots();

-- -- authorization (app/authz) --------------------------------------------------------------
-- name: casbin_grants
-- The grants the DBA and the administration API add to the built-in policy, in order.
SELECT ptype, v0, v1, v2, v3, v4, v5 FROM dlw.casbin_rule ORDER BY id

-- name: grant_version
-- The counter the casbin_rule trigger bumps: a notification reloads the policy only when it moved.
SELECT version FROM dlw.grant_version

-- name: platform_metrics
-- /metrics (app/api/metrics.py): counts across tenants, the $1 busiest tenants labelled by slug.
SELECT metric, tenant, state, value FROM dlw.platform_metrics($1);

-- name: hub_token_ciphertext
SELECT dlw.hub_token_ciphertext() AS ciphertext;

-- name: set_hub_token
SELECT dlw.set_hub_token($1) AS outcome;

-- name: clear_hub_token
SELECT dlw.clear_hub_token() AS outcome;

-- name: hub_token_status
SELECT * FROM dlw.hub_token_status();

-- name: grant_changes
-- What changed since version $1, in one snapshot: the current version, the oldest version whose
-- changes are all recorded, and each rule changed since $1 with whether it is a grant now (one
-- probe of the unique index per changed rule: LATERAL ... LIMIT 1, never a hashed scan of the
-- whole table, which an EXISTS may be planned as).
SELECT g.version, g.changes_from, c.ptype, c.v0, c.v1, c.v2, c.v3, c.v4, c.v5, coalesce(p.present, false) AS present
FROM dlw.grant_version g
LEFT JOIN LATERAL (SELECT DISTINCT x.ptype, x.v0, x.v1, x.v2, x.v3, x.v4, x.v5 FROM dlw.casbin_rule_changes x
                    WHERE x.version > $1 AND x.version <= g.version AND g.changes_from <= $1 + 1) c ON true
LEFT JOIN LATERAL (SELECT true AS present FROM dlw.casbin_rule r
                    WHERE r.ptype = c.ptype AND r.v0 = c.v0 AND r.v1 = c.v1 AND r.v2 = c.v2 AND r.v3 = c.v3
                      AND r.v4 = c.v4 AND r.v5 = c.v5
                    LIMIT 1) p ON true

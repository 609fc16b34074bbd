-- Application SQL of the command-line tools (asyncpg, $n placeholders), one `-- name:` block
-- each, loaded by app/ops/queries.py. The API's SQL lives with its routes; the database
-- program itself in sql/.

-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = $1

-- Statements that take an identifier or a literal are built by the server's format(), so
-- quoting is PostgreSQL's own.
-- name: create_database_statement
SELECT format('CREATE DATABASE %I', $1::text)

-- name: app_password_statement
SELECT format('ALTER ROLE dlw_app PASSWORD %L', $1::text)

-- name: provision_tenant
SELECT dlw.provision_tenant($1, $2)

-- name: resolve_tenant
SELECT tenant_id, active FROM dlw.resolve_tenant($1)

-- name: admin_create_tenant
SELECT dlw_admin.create_tenant($1, $2, $3, $4, $5)

-- The column order is the order `dlw tenant list` prints.
-- name: admin_list_tenants
SELECT tenant_id, slug, display_name, active, live_tasks, quota_concurrent, bytes_used_month,
       quota_bytes_month, bytes_used_pct, quota_storage_gb, reporting_logins
FROM dlw_admin.list_tenants()

-- name: admin_set_quota
SELECT concurrent_limit, bytes_month_limit, storage_gb_limit FROM dlw_admin.set_quota($1, $2, $3, $4)

-- name: admin_deactivate_tenant
SELECT tasks_cancelled, files_cancelled FROM dlw_admin.deactivate_tenant($1, $2)

-- name: admin_create_reporting_login
SELECT dlw_admin.create_reporting_login($1, $2, $3)

-- name: admin_drop_reporting_login
SELECT dlw_admin.drop_reporting_login($1)

-- The column order is the order `dlw user list` prints.
-- name: admin_list_users
SELECT user_id, email, email_verified, role, granted_roles, last_login_at FROM dlw_admin.list_users($1)

-- name: admin_grant_role
SELECT dlw_admin.grant_role($1, $2, $3)

-- name: admin_revoke_role
SELECT dlw_admin.revoke_role($1, $2, $3)

-- Timeouts in seconds (NULL = keep), temp_file_limit in bytes.
-- name: admin_set_reporting_login_limits
SELECT connections_limit, statement_timeout_limit, idle_in_transaction_limit, temp_file_bytes_limit, transaction_limit
FROM dlw_admin.set_reporting_login_limits($1, $2, $3 * interval '1 second', $4 * interval '1 second', $5,
                                          $6 * interval '1 second')

-- The sessions that block a waiting connection of one `dlw migrate` run (found by the run's
-- application_name, $1): who they are and how long they have been in their state. Run by
-- app/ops/lock_waits.py (psycopg with a raw cursor, so $1 as everywhere here).
-- name: migrate_lock_blockers
SELECT DISTINCT b.pid, b.usename::text, b.application_name, b.state,
       round(extract(epoch FROM now() - coalesce(b.state_change, b.backend_start)))::bigint
FROM pg_stat_activity w
CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocking(pid)
JOIN pg_stat_activity b ON b.pid = blocking.pid
WHERE w.application_name = $1 AND w.wait_event_type = 'Lock' AND w.datname = current_database()
ORDER BY b.pid

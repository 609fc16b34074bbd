-- Reporting logins may read, never disturb: each one gets a connection limit and role defaults
-- for statement_timeout, idle_in_transaction_session_timeout and temp_file_limit. The values
-- live here, one row per login (column defaults = the platform defaults, mirrored in
-- app/domain.py); dlw.set_login_role_limits (sql/90_login_roles.sql) applies them to the role,
-- dlw.cancel_overlong_reporting_queries (sql/50_snapshots.sql, run with every usage fold) enforces the two
-- timeouts a login can override in its session, and `dlw doctor` checks the role matches its row.
-- See docs/security-model.md, "Reporting logins cannot disturb the platform".

SET ROLE dlw_owner;

ALTER TABLE dlw.reporting_logins
    ADD COLUMN IF NOT EXISTS connection_limit integer NOT NULL DEFAULT 5
        CONSTRAINT reporting_logins_connection_limit CHECK (connection_limit BETWEEN 1 AND 100),
    ADD COLUMN IF NOT EXISTS statement_timeout_ms integer NOT NULL DEFAULT 300000
        CONSTRAINT reporting_logins_statement_timeout CHECK (statement_timeout_ms BETWEEN 1000 AND 86400000),
    ADD COLUMN IF NOT EXISTS idle_in_transaction_timeout_ms integer NOT NULL DEFAULT 300000
        CONSTRAINT reporting_logins_idle_timeout CHECK (idle_in_transaction_timeout_ms BETWEEN 1000 AND 86400000),
    ADD COLUMN IF NOT EXISTS temp_file_limit_kb integer NOT NULL DEFAULT 1048576
        CONSTRAINT reporting_logins_temp_file_limit CHECK (temp_file_limit_kb >= 1024);
COMMENT ON COLUMN dlw.reporting_logins.connection_limit IS
    'CONNECTION LIMIT of the login role (1 to 100): connections beyond it are refused with "too many connections for role"';
COMMENT ON COLUMN dlw.reporting_logins.statement_timeout_ms IS
    'statement_timeout role default (ms); the login may lower or disable it in its session, the watchdog cancels its statements that run longer anyway';
COMMENT ON COLUMN dlw.reporting_logins.idle_in_transaction_timeout_ms IS
    'idle_in_transaction_session_timeout role default (ms); the watchdog terminates its sessions idle in a transaction for longer anyway';
COMMENT ON COLUMN dlw.reporting_logins.temp_file_limit_kb IS
    'temp_file_limit role default (kB): a superuser-only setting, so the login cannot raise it';

RESET ROLE;

-- temp_file_limit is PGC_SUSET: without this grant (PostgreSQL 15+) only a superuser may
-- store it as a role default. It lets dlw_login_manager set (and, being no superuser, itself
-- lower or raise) that one parameter; reporting logins still cannot change it.
GRANT SET ON PARAMETER temp_file_limit TO dlw_login_manager;

-- The watchdog is owned by dlw_system: it must see the state and start time of reporting
-- logins' backends (hidden from other roles without pg_read_all_stats) and cancel or
-- terminate them (pg_signal_backend; never a superuser's backend). Its one function acts only
-- on the backends of this database's reporting logins.
GRANT pg_signal_backend, pg_read_all_stats TO dlw_system;

-- Existing logins get the limits now (new ones get them from dlw_admin.create_reporting_login).
-- A superuser may alter every mapped role, including ones made outside DLW.
DO $existing$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT m.* FROM dlw.reporting_logins m
               JOIN pg_roles ro ON ro.rolname = m.login
              WHERE NOT ro.rolsuper
              ORDER BY m.login
    LOOP
        EXECUTE format('ALTER ROLE %I CONNECTION LIMIT %s', r.login, r.connection_limit);
        EXECUTE format('ALTER ROLE %I SET statement_timeout = %s', r.login, r.statement_timeout_ms);
        EXECUTE format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %s', r.login,
                       r.idle_in_transaction_timeout_ms);
        EXECUTE format('ALTER ROLE %I SET temp_file_limit = %s', r.login, r.temp_file_limit_kb);
    END LOOP;
END
$existing$;

-- Reporting logins: a bound on a transaction's age. statement_timeout and
-- idle_in_transaction_session_timeout bound each statement and each idle pause, not the
-- transaction: a login that sends a short statement every second keeps one snapshot (holding
-- back vacuum) and its share locks (making `dlw migrate --reapply-sql` give up) for ever.
-- PostgreSQL 15/16 have no setting for this (transaction_timeout arrived in 17, and a login
-- could SET it to 0 anyway), so the reporting watchdog, dlw.cancel_overlong_reporting_queries
-- (sql/50_snapshots.sql, run with every usage fold), terminates a reporting backend whose
-- transaction is older than this limit. Column default = the platform default (mirrored in
-- app/domain.py); set per login with dlw_admin.set_reporting_login_limits; `dlw doctor` reports
-- reporting transactions older than their limit (the watchdog is not running).

SET ROLE dlw_owner;

ALTER TABLE dlw.reporting_logins
    ADD COLUMN IF NOT EXISTS transaction_timeout_ms integer NOT NULL DEFAULT 900000
        CONSTRAINT reporting_logins_transaction_timeout CHECK (transaction_timeout_ms BETWEEN 1000 AND 86400000);
COMMENT ON COLUMN dlw.reporting_logins.transaction_timeout_ms IS
    'Longest transaction (ms, from its first statement): the watchdog terminates a session of the login whose transaction is older, however busy it keeps it (no role setting on PostgreSQL 15/16)';

RESET ROLE;

-- owner: dlw_owner
-- Reporting on a hot standby (docs/reporting.md, docs/high-availability.md): analysts should be able to
-- tell how old the data they read is. A function rather than a view: every relation a reporting
-- login reads carries tenant_id (tests check it), and this row is about the server, not a tenant.
-- It runs with the caller's privileges and reads only what PostgreSQL shows every role.

CREATE OR REPLACE FUNCTION reporting.replica_status(
    OUT is_standby boolean,
    OUT last_replayed_at timestamptz,
    OUT since_last_replay interval,
    OUT replay_caught_up boolean,
    OUT lag interval
) RETURNS record
LANGUAGE sql STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_is_in_recovery(),
           pg_last_xact_replay_timestamp(),
           now() - pg_last_xact_replay_timestamp(),
           -- Everything the standby received is applied (true on a primary: nothing to apply).
           coalesce(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), NOT pg_is_in_recovery()),
           CASE
               WHEN NOT pg_is_in_recovery() THEN interval '0'
               WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN interval '0'
               ELSE now() - pg_last_xact_replay_timestamp()
           END
$$;
COMMENT ON FUNCTION reporting.replica_status() IS
    'Where this session reads from and how far behind it is: is_standby (pg_is_in_recovery: a streaming replica), last_replayed_at (commit time of the last transaction replayed from the primary; NULL on a primary), since_last_replay (now() minus that: grows on an idle primary too, so read it with replay_caught_up), replay_caught_up (every WAL record received is applied; true on a primary), lag (0 on a primary or a caught-up standby, else since_last_replay: how old the newest data you see may be). A standby cannot see WAL its primary has not sent yet; the primary''s pg_stat_replication shows that part. Works on the primary too.';
REVOKE ALL ON FUNCTION reporting.replica_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION reporting.replica_status() TO dlw_reporting, dlw_admin;

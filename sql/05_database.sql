-- owner: dlw_owner
-- Database-level privileges. They live outside any schema (and CREATE DATABASE ... TEMPLATE
-- does not copy them), so `dlw migrate` re-asserts them on every run by calling this.
--
-- Advisory locks. The platform depends on three: the snapshot leader's session lock
-- (app/api/snapshot_leader.py), the migrate lock (app/ops/migrate.py) and the refresh's
-- transaction lock (sql/50_snapshots.sql). Any role that may execute pg_advisory_lock could take
-- one and stop snapshots for every tenant or make `dlw migrate` hang, and PostgreSQL grants every
-- advisory-lock function to PUBLIC. Privileges on pg_catalog's functions are kept per database
-- (in its pg_proc), so this database revokes all of them from PUBLIC (every variant, found by
-- name: session and transaction, shared, bigint and (int, int) keys, try_, unlock, unlock_all)
-- and grants back exactly these: pg_try_advisory_lock(bigint) to dlw_app (the leader),
-- pg_advisory_unlock_all() to dlw_app (asyncpg's pool runs it when it resets a connection; it
-- releases only the session's own locks), pg_try_advisory_xact_lock(bigint) to dlw_system
-- (owner of dlw.refresh_quota_snapshots), and pg_advisory_xact_lock(bigint) to dlw_app and
-- dlw_system (the storage-target limit trigger, sql/20_tenants.sql, run by whoever inserts a
-- target: the API or a dlw_admin function; a transaction lock, gone at commit).
-- Superusers (dlw migrate, pg_cron's job) are unaffected. dlw doctor checks it.

CREATE OR REPLACE FUNCTION dlw.secure_database() RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
DECLARE
    v_function regprocedure;
    v_object   text;
    v_kind     text;
BEGIN
    -- Only DLW's roles connect; nobody but the owner creates schemas or temporary objects.
    EXECUTE format('REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CREATE, CONNECT, TEMPORARY ON DATABASE %I TO dlw_owner', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dlw_app, dlw_reporting, dlw_admin', current_database());
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;

    -- Nobody but the platform takes advisory locks here (see the header).
    FOR v_function IN
        SELECT p.oid FROM pg_proc p
         WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ '^pg_(try_)?advisory_'
         ORDER BY p.oid
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
    GRANT EXECUTE ON FUNCTION pg_try_advisory_lock(bigint), pg_advisory_unlock_all() TO dlw_app;
    GRANT EXECUTE ON FUNCTION pg_try_advisory_xact_lock(bigint) TO dlw_system;
    GRANT EXECUTE ON FUNCTION pg_advisory_xact_lock(bigint) TO dlw_app, dlw_system;

    -- pg_stat_statements, when present (pg_auto_failover's pg_autoctl creates it in the database
    -- it manages), grants PUBLIC the statistics of every role's statements: no login of one
    -- tenant reads another's. Superusers and pg_read_all_stats members still read them.
    FOR v_object, v_kind IN
        SELECT d.objid::regclass::text, 'TABLE' FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE e.extname = 'pg_stat_statements' AND d.deptype = 'e' AND d.classid = 'pg_class'::regclass
        UNION ALL
        SELECT d.objid::regprocedure::text, 'FUNCTION' FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE e.extname = 'pg_stat_statements' AND d.deptype = 'e' AND d.classid = 'pg_proc'::regclass
        ORDER BY 1
    LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM PUBLIC', v_kind, v_object);
    END LOOP;
END
$$;
COMMENT ON FUNCTION dlw.secure_database() IS
    'Re-asserts database-level privileges (CONNECT only for DLW roles, no TEMP or CREATE for PUBLIC) and the per-database EXECUTE on the advisory-lock functions (none for PUBLIC; pg_try_advisory_lock(bigint) and pg_advisory_unlock_all() for dlw_app, pg_try_advisory_xact_lock(bigint) for dlw_system, pg_advisory_xact_lock(bigint) for both, for the storage-target limit), and revokes from PUBLIC the objects of pg_stat_statements when that extension is installed here (pg_autoctl installs it): other roles'' statement statistics. Run by dlw migrate as a superuser.';
REVOKE ALL ON FUNCTION dlw.secure_database() FROM PUBLIC;

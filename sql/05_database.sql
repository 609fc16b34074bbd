-- owner: dlw_owner
-- Database-level privileges. They live outside any schema (and CREATE DATABASE ... TEMPLATE
-- does not copy them), so `dlw migrate` re-asserts them on every run by calling this.

CREATE OR REPLACE FUNCTION dlw.secure_database() RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
BEGIN
    -- Only DLW's roles connect; nobody but the owner creates schemas or temporary objects.
    EXECUTE format('REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CREATE, CONNECT, TEMPORARY ON DATABASE %I TO dlw_owner', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dlw_app, dlw_reporting, dlw_admin', current_database());
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
END
$$;
COMMENT ON FUNCTION dlw.secure_database() IS
    'Re-asserts database-level privileges (CONNECT only for DLW roles, no TEMP or CREATE for PUBLIC). Run by dlw migrate as the database owner or a superuser.';
REVOKE ALL ON FUNCTION dlw.secure_database() FROM PUBLIC;

-- Every index of a tenant table leads with tenant_id, so that no query under row-level security
-- can fetch another tenant's row through an index and only then drop it by the policy's filter:
-- EXPLAIN ANALYZE would show that row ("Rows Removed by Filter: 1") for another tenant's id or
-- slug, and nothing for one that does not exist. Primary keys, unique keys and foreign keys
-- already lead with tenant_id (0002); two indexes did not:
--
--   task_files_id (id)        the executor reports find a file by id across tenants;
--   tenants_slug_key (slug)   slugs are unique across the platform.
--
-- Both are replaced by indexes on dlw.cross_tenant_key(column), an identity function that is not
-- LEAKPROOF and that reporting logins may not execute. PostgreSQL applies a non-leakproof
-- condition only after the row-level security condition, so it is never an index condition
-- ahead of the policy: under RLS these indexes are never used. The definer functions
-- (dlw_system, which bypasses RLS) use them by writing dlw.cross_tenant_key(...) = ... .
-- The function is PL/pgSQL so that it is never inlined (an inlined SQL function would turn the
-- index back into a plain index on the column). sql/00_context.sql re-creates it with its
-- comment and grants; it lives here first because the indexes depend on it (like dlw.new_id).
--
-- Existing databases: the new indexes are built first, then the old ones dropped, in this one
-- migration (the sql/ program, re-applied right after, uses the new ones).

SET ROLE dlw_owner;

CREATE FUNCTION dlw.cross_tenant_key(p_value uuid) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
CREATE FUNCTION dlw.cross_tenant_key(p_value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
REVOKE ALL ON FUNCTION dlw.cross_tenant_key(uuid), dlw.cross_tenant_key(text) FROM PUBLIC;
-- Whoever writes the rows evaluates the index expression: task files are written by the API
-- (dlw_app) and the executor functions (dlw_system), tenants only by dlw_system's functions.
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(uuid) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(text) TO dlw_system;

CREATE INDEX task_files_id_cross_tenant ON dlw.task_files (dlw.cross_tenant_key(id));
COMMENT ON INDEX dlw.task_files_id_cross_tenant IS
    'A file by id across tenants, for the executor reports (dlw_system); never used under row-level security (dlw.cross_tenant_key is not leakproof)';
DROP INDEX dlw.task_files_id;

CREATE UNIQUE INDEX tenants_slug_cross_tenant ON dlw.tenants (dlw.cross_tenant_key(slug));
COMMENT ON INDEX dlw.tenants_slug_cross_tenant IS
    'Slugs are unique across the platform; tenant lookups by slug (dlw_system) use it, row-level security never does (dlw.cross_tenant_key is not leakproof)';
ALTER TABLE dlw.tenants DROP CONSTRAINT tenants_slug_key;

RESET ROLE;

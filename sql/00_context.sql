-- owner: dlw_owner
-- Tenant context: who the current transaction acts for.
-- The API (as dlw_app) sets three transaction-local settings in one statement at the start
-- of each request; policies for dlw_app read them. Policies for reporting logins never read
-- them: a reporting login's tenant comes from its login name (dlw.reporting_tenant_id()).
-- All helpers are STABLE and policies call them as (SELECT ...), so each runs once per
-- statement instead of once per row.

-- The helpers use SQL-standard bodies (RETURN / BEGIN ATOMIC): their names are bound when the
-- function is created, so no search_path can redirect them, and with no SET clause PostgreSQL
-- can inline them into the queries that call them (a policy's lookup then costs ~1 us).

CREATE OR REPLACE FUNCTION dlw.ctx_tenant_id() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
-- After a committed set_config(..., true) a pooled connection reads back '' (not NULL), and
-- ''::bigint would raise: treat both as "no tenant", which matches no row.
RETURN nullif(current_setting('dlw.tenant_id', true), '')::bigint;
COMMENT ON FUNCTION dlw.ctx_tenant_id() IS
    'Tenant id of the current transaction (setting dlw.tenant_id), or NULL when unset. Trusted only in dlw_app policies.';

CREATE OR REPLACE FUNCTION dlw.ctx_user_id() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(current_setting('dlw.user_id', true), '');
COMMENT ON FUNCTION dlw.ctx_user_id() IS
    'Acting principal of the current transaction (setting dlw.user_id), or NULL; recorded in audit rows.';

CREATE OR REPLACE FUNCTION dlw.ctx_role() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(current_setting('dlw.role', true), '');
COMMENT ON FUNCTION dlw.ctx_role() IS
    'Role of the acting principal (setting dlw.role), or NULL; write policies admit only roles that may write.';

CREATE OR REPLACE FUNCTION dlw.set_context(p_tenant_id bigint, p_user_id text, p_role text)
RETURNS void
LANGUAGE sql VOLATILE
BEGIN ATOMIC
    -- Transaction-local (is_local = true): safe behind a transaction pooler; never a plain SET.
    SELECT set_config('dlw.tenant_id', coalesce(p_tenant_id::text, ''), true),
           set_config('dlw.user_id', coalesce(p_user_id, ''), true),
           set_config('dlw.role', coalesce(p_role, ''), true);
END;
COMMENT ON FUNCTION dlw.set_context(bigint, text, text) IS
    'Sets the tenant context for the rest of the current transaction only (dlw.tenant_id, dlw.user_id, dlw.role).';

-- Replaces the first version created by migrations/0002 (tables use it as a column default).
CREATE OR REPLACE FUNCTION dlw.new_id() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN encode(
    set_bit(set_bit(
        overlay(uuid_send(gen_random_uuid())
                PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
        52, 1), 53, 1),
    'hex')::uuid;
COMMENT ON FUNCTION dlw.new_id() IS 'A UUIDv7-style id: 48-bit millisecond timestamp then random bits';

-- The key of the two indexes that cross tenants (migrations/0009.tenant_led_indexes.sql):
-- task_files_id_cross_tenant and tenants_slug_cross_tenant. An identity function that is NOT
-- LEAKPROOF: PostgreSQL evaluates a non-leakproof condition only after the row-level security
-- condition, so under RLS these indexes are never an index condition ahead of the policy and a
-- caller cannot fetch another tenant's row through them (EXPLAIN ANALYZE reveals nothing). Only
-- dlw_system (BYPASSRLS) uses them, by writing dlw.cross_tenant_key(column) = dlw.cross_tenant_key(value).
-- PL/pgSQL so that it is never inlined; its body must stay the identity (the indexes store it).
CREATE OR REPLACE FUNCTION dlw.cross_tenant_key(p_value uuid) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
COMMENT ON FUNCTION dlw.cross_tenant_key(uuid) IS
    'Identity, not leakproof: the key of task_files_id_cross_tenant (a file by id across tenants, for dlw_system only; never used under RLS). Its writers (dlw_app, dlw_system) may execute it, reporting logins may not.';
CREATE OR REPLACE FUNCTION dlw.cross_tenant_key(p_value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
COMMENT ON FUNCTION dlw.cross_tenant_key(text) IS
    'Identity, not leakproof: the key of tenants_slug_cross_tenant (slugs unique across the platform; lookups by slug for dlw_system only; never used under RLS). Only dlw_system, which writes tenants, may execute it.';
-- Two more keys (migrations/0016.flat_costs.sql, which creates them first: indexes depend on
-- them): lease expiries across tenants (the expiry sweep) and the executor queue's ranking.
CREATE OR REPLACE FUNCTION dlw.cross_tenant_key(p_value timestamptz) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
COMMENT ON FUNCTION dlw.cross_tenant_key(timestamptz) IS
    'Identity, not leakproof: the key of task_files_lease_expiry (expired leases across tenants, for the expiry sweep of dlw_system; never used under RLS). Its writers (dlw_app, dlw_system) may execute it, reporting logins may not.';
CREATE OR REPLACE FUNCTION dlw.cross_tenant_key(p_value bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$ BEGIN RETURN p_value; END $$;
COMMENT ON FUNCTION dlw.cross_tenant_key(bigint) IS
    'Identity, not leakproof: the keys of executor_queue_rank (tenants ranked by files in flight across tenants, for the fair claim of dlw_system; never used under RLS). Only dlw_system, which writes the queue summary, may execute it.';
REVOKE ALL ON FUNCTION dlw.cross_tenant_key(timestamptz), dlw.cross_tenant_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(timestamptz) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(bigint) TO dlw_system;
REVOKE ALL ON FUNCTION dlw.cross_tenant_key(uuid), dlw.cross_tenant_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(uuid) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.cross_tenant_key(text) TO dlw_system;

CREATE OR REPLACE FUNCTION dlw.reporting_tenant_id() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $$
    -- reporting_logins is itself under RLS: a login can read only the row naming itself.
    SELECT tenant_id FROM dlw.reporting_logins WHERE login = current_user
$$;
COMMENT ON FUNCTION dlw.reporting_tenant_id() IS
    'Tenant of the current reporting login (from dlw.reporting_logins), or NULL. Ignores every setting.';

REVOKE ALL ON FUNCTION dlw.ctx_tenant_id(), dlw.ctx_user_id(), dlw.ctx_role(),
    dlw.set_context(bigint, text, text), dlw.reporting_tenant_id(), dlw.new_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.ctx_tenant_id(), dlw.ctx_user_id(), dlw.ctx_role(),
    dlw.set_context(bigint, text, text), dlw.new_id() TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.reporting_tenant_id() TO dlw_reporting, dlw_app, dlw_system;

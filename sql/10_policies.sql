-- owner: dlw_owner
-- Row-level security policies for every tenant table, rebuilt from this one list on each
-- migrate (all in one transaction, so no moment exists without them).
--
-- Two audiences, each with policies scoped TO its role:
--   dlw_app        trusts the transaction's tenant context (dlw.ctx_tenant_id()) and, for
--                  writes, the acting role (dlw.ctx_role()): a viewer cannot write even if a
--                  route forgot its permission check.
--   dlw_reporting  ignores every setting: the tenant comes from the login's own mapping.
-- A role with no policy on a table sees no rows and can write none: missing context fails closed.

CREATE OR REPLACE FUNCTION pg_temp.policy_expr(base text, roles text[]) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN roles IS NULL THEN base
                ELSE base || ' AND (SELECT dlw.ctx_role()) = ANY (' || quote_literal(roles) || '::text[])'
           END
$$;

DO $policies$
DECLARE
    -- table, roles allowed to read (NULL = any role in context), roles allowed to insert,
    -- update, delete ('{}' = nobody through RLS; definer functions do that work), reporting?
    spec record;
    pol record;
    writers   CONSTANT text[] := '{tenant_admin,tenant_operator,system_admin}';
    admins    CONSTANT text[] := '{tenant_admin,system_admin}';
    nobody    CONSTANT text[] := '{}';
    same_tenant CONSTANT text := 'tenant_id = (SELECT dlw.ctx_tenant_id())';
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES
            ('tenants',          NULL::text[], nobody,  nobody,  nobody,  true),
            ('projects',         NULL,         admins,  admins,  admins,  true),
            ('users',            NULL,         nobody,  admins,  nobody,  false),
            ('service_accounts', admins,       admins,  admins,  admins,  false),
            ('storage_targets',  NULL,         admins,  admins,  admins,  true),
            -- the cross-tenant root registry: read-only for its own tenant, written by
            -- dlw_system's definer code only (sql/19_storage_roots.sql)
            ('storage_roots',    NULL,         nobody,  nobody,  nobody,  false),
            ('tasks',            NULL,         writers, writers, nobody,  true),
            ('task_files',       NULL,         writers, writers, nobody,  true),
            ('idempotency_keys', writers,      writers, nobody,  nobody,  false),
            ('usage_records',    NULL,         nobody,  nobody,  nobody,  true),
            ('quota_snapshots',  NULL,         writers, writers, nobody,  true),
            ('audit_log',        admins,       NULL,    nobody,  nobody,  true),
            ('reporting_logins', admins,       nobody,  nobody,  nobody,  true),
            -- read by task creation (resolving on the hub), written by tenant admins only
            ('hub_tokens',       writers,      admins,  admins,  admins,  false),
            ('executor_queue',   NULL,         nobody,  nobody,  nobody,  false),
            -- deletion work items: read by the tenant, written only by dlw_system's definer
            -- functions (sql/44_executor_deletions.sql)
            ('task_deletions',   NULL,         nobody,  nobody,  nobody,  true),
            -- the dedup registry and the storage counter (sql/23_stored_blobs.sql): read-only for
            -- the tenant, written by dlw_system's definer code only; reporting reads the counter
            ('stored_blobs',     NULL,         nobody,  nobody,  nobody,  false),
            ('storage_usage',    NULL,         nobody,  nobody,  nobody,  true)
        ) AS s(tbl, readers, inserters, updaters, deleters, reporting)
    LOOP
        FOR pol IN SELECT policyname FROM pg_policies WHERE schemaname = 'dlw' AND tablename = spec.tbl
        LOOP
            EXECUTE format('DROP POLICY %I ON dlw.%I', pol.policyname, spec.tbl);
        END LOOP;

        EXECUTE format('CREATE POLICY app_select ON dlw.%I AS PERMISSIVE FOR SELECT TO dlw_app USING (%s)',
                       spec.tbl, pg_temp.policy_expr(same_tenant, spec.readers));
        IF spec.inserters IS DISTINCT FROM nobody THEN
            EXECUTE format('CREATE POLICY app_insert ON dlw.%I FOR INSERT TO dlw_app WITH CHECK (%s)',
                           spec.tbl, pg_temp.policy_expr(same_tenant, spec.inserters));
        END IF;
        IF spec.updaters IS DISTINCT FROM nobody THEN
            EXECUTE format('CREATE POLICY app_update ON dlw.%I FOR UPDATE TO dlw_app USING (%s) WITH CHECK (%s)',
                           spec.tbl, pg_temp.policy_expr(same_tenant, spec.updaters),
                           pg_temp.policy_expr(same_tenant, spec.updaters));
        END IF;
        IF spec.deleters IS DISTINCT FROM nobody THEN
            EXECUTE format('CREATE POLICY app_delete ON dlw.%I FOR DELETE TO dlw_app USING (%s)',
                           spec.tbl, pg_temp.policy_expr(same_tenant, spec.deleters));
        END IF;
        IF spec.reporting THEN
            IF spec.tbl = 'reporting_logins' THEN
                EXECUTE 'CREATE POLICY reporting_select ON dlw.reporting_logins FOR SELECT TO dlw_reporting
                         USING (login = current_user)';
            ELSE
                EXECUTE format('CREATE POLICY reporting_select ON dlw.%I FOR SELECT TO dlw_reporting
                                USING (tenant_id = (SELECT dlw.reporting_tenant_id()))', spec.tbl);
            END IF;
        END IF;
    END LOOP;
END
$policies$;

-- The platform operator (system_admin) lists and reads every tenant's row; every other
-- role sees only its own tenant. Creating and changing tenants goes through the definer
-- functions in sql/70_administration.sql.
CREATE POLICY app_platform_select ON dlw.tenants FOR SELECT TO dlw_app
    USING ((SELECT dlw.ctx_role()) = 'system_admin');

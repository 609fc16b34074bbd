-- owner: dlw_system
-- dlw_admin: users and role grants, support access, usage snapshots, and the grants of every
-- dlw_admin function. See sql/91_dlw_admin_helpers.sql for the conventions and error codes.

-- ---------------------------------------------------------------------------------------
-- Users and role grants (casbin g rows in dlw.casbin_rule; every API instance reloads on NOTIFY)
-- ---------------------------------------------------------------------------------------

-- Its result gained email_verified (migration 0010): a changed row type needs a new function.
DROP FUNCTION IF EXISTS dlw_admin.list_users(text);
CREATE OR REPLACE FUNCTION dlw_admin.list_users(tenant_slug text)
RETURNS TABLE (user_id uuid, email text, role text, granted_roles text[], issuer text, created_at timestamptz,
               last_login_at timestamptz, email_verified boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint := dlw.admin_tenant_id(list_users.tenant_slug);
BEGIN
    PERFORM dlw.admin_audit(v_id, 'admin.users_listed', NULL, jsonb_build_object('via', 'dlw_admin.list_users'));
    RETURN QUERY
    SELECT u.id, u.email, u.role,
           coalesce((SELECT array_agg(c.v1 ORDER BY c.v1) FROM dlw.casbin_rule c
                      WHERE c.ptype = 'g' AND c.v0 = 'user:' || u.id::text), '{}'::text[]),
           u.issuer, u.created_at, u.last_login_at, u.email_verified
      FROM dlw.users u
     WHERE u.tenant_id = v_id
     ORDER BY u.created_at, u.id;
END
$$;
COMMENT ON FUNCTION dlw_admin.list_users(text) IS
    'The users of a tenant: id, email (as verified by the identity provider at the latest login: email_verified), the role they were given at first login (role) and the extra roles granted with dlw_admin.grant_role (granted_roles). Audited as admin.users_listed. Raises DLWA1 (no such tenant).';

CREATE OR REPLACE FUNCTION dlw_admin.grant_role(tenant_slug text, user_ref text, role text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id    bigint := dlw.admin_tenant_id(grant_role.tenant_slug);
    v_role  text := grant_role.role;
    v_user  uuid;
    v_new   boolean;
BEGIN
    IF v_role IS NULL OR NOT v_role = ANY ((SELECT f.tenant_roles FROM dlw.domain_facts() f)::text[]) THEN
        RAISE EXCEPTION 'role % cannot be granted', coalesce(quote_literal(v_role), 'NULL') USING ERRCODE = '22023',
            HINT = 'grantable roles: tenant_admin, tenant_operator, tenant_viewer (they apply in the user''s own tenant)';
    END IF;
    v_user := dlw.admin_user_id(v_id, grant_role.user_ref);
    INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:' || v_user::text, v_role)
    ON CONFLICT DO NOTHING;
    v_new := FOUND;
    PERFORM dlw.admin_audit(v_id, 'role.granted', v_user::text,
        jsonb_build_object('via', 'dlw_admin.grant_role', 'role', v_role, 'already_granted', NOT v_new));
    RETURN v_new;
END
$$;
COMMENT ON FUNCTION dlw_admin.grant_role(text, text, text) IS
$c$Grants a user (by id, or by an email verified by the identity provider and held by no other user of the tenant) a tenant role on top of the role they already have: a casbin g row "user:<id>, <role>"; running API instances pick it up within a second. Returns true when granted, false when it already was. Audited as role.granted.
Raises DLWA1 (no such tenant), DLWA5 (no such user in the tenant), DLWA8 (an unverified email), DLWA9 (an email shared by several users), 22023 (role not grantable).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.revoke_role(tenant_slug text, user_ref text, role text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id      bigint := dlw.admin_tenant_id(revoke_role.tenant_slug);
    v_role    text := revoke_role.role;
    v_user    uuid := dlw.admin_user_id(v_id, revoke_role.user_ref);
    v_removed boolean;
BEGIN
    DELETE FROM dlw.casbin_rule c WHERE c.ptype = 'g' AND c.v0 = 'user:' || v_user::text AND c.v1 = v_role;
    v_removed := FOUND;
    PERFORM dlw.admin_audit(v_id, 'role.revoked', v_user::text,
        jsonb_build_object('via', 'dlw_admin.revoke_role', 'role', v_role, 'was_granted', v_removed));
    IF NOT v_removed AND EXISTS (SELECT 1 FROM dlw.users u WHERE u.tenant_id = v_id AND u.id = v_user AND u.role = v_role) THEN
        RAISE NOTICE '% is the user''s own role, not a grant; a tenant admin changes it (PATCH /api/v1/users/{id})', v_role;
    END IF;
    RETURN v_removed;
END
$$;
COMMENT ON FUNCTION dlw_admin.revoke_role(text, text, text) IS
$c$Revokes a role granted with dlw_admin.grant_role (deletes the casbin g row). Returns true when a grant was removed, false when there was none (the user's own role, dlw.users.role, is not a grant: a NOTICE says so). Audited as role.revoked.
Raises DLWA1 (no such tenant), DLWA5 (no such user in the tenant), DLWA8 (an unverified email), DLWA9 (an email shared by several users).$c$;

-- ---------------------------------------------------------------------------------------
-- Support: see what a tenant sees
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw_admin.view_as_tenant(tenant_slug text, reporting_view anyelement)
RETURNS SETOF anyelement
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id  bigint := dlw.admin_tenant_id(view_as_tenant.tenant_slug);
    v_rel regclass;
BEGIN
    SELECT c.oid::regclass INTO v_rel
      FROM pg_type ty JOIN pg_class c ON c.oid = ty.typrelid
     WHERE ty.oid = pg_typeof(view_as_tenant.reporting_view)
       AND c.relnamespace = 'reporting'::regnamespace AND c.relkind = 'v';
    IF v_rel IS NULL THEN
        RAISE EXCEPTION '% is not a reporting view', pg_typeof(view_as_tenant.reporting_view) USING ERRCODE = '22023',
            HINT = 'pass a typed NULL of a view, e.g. NULL::reporting.tasks';
    END IF;
    PERFORM dlw.admin_audit(v_id, 'support.viewed_as_tenant', v_rel::text,
        jsonb_build_object('via', 'dlw_admin.view_as_tenant'));
    -- Exactly the rows the tenant's reporting logins see (their policy is tenant_id = theirs).
    RETURN QUERY EXECUTE format('SELECT v.* FROM %s AS v WHERE v.tenant_id = $1', v_rel) USING v_id;
END
$$;
COMMENT ON FUNCTION dlw_admin.view_as_tenant(text, anyelement) IS
$c$Support access, read-only: the rows a tenant's reporting logins see in one reporting view, e.g. SELECT * FROM dlw_admin.view_as_tenant('acme', NULL::reporting.quota_status). Filter, sort and limit outside the call. Audited in that tenant's own trail as support.viewed_as_tenant (the tenant can see that support looked).
Raises DLWA1 (no such tenant), 22023 (not a reporting view).$c$;

-- ---------------------------------------------------------------------------------------
-- Usage snapshots: a forced refresh and the drift check, audited in the platform tenant's trail.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw_admin.refresh_quota_snapshots()
RETURNS TABLE (ran boolean, events bigint, tenants integer, periods integer, folded_from xid8, folded_below xid8)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM dlw.refresh_quota_snapshots();
    PERFORM dlw.admin_audit((SELECT f.platform_tenant_id FROM dlw.domain_facts() f), 'snapshots.refreshed', NULL, jsonb_build_object('via', 'dlw_admin.refresh_quota_snapshots'));
END
$$;
COMMENT ON FUNCTION dlw_admin.refresh_quota_snapshots() IS
    'Folds new usage into quota_snapshots now (what the per-minute job does; skipped, ran = false, if a run is in progress). Audited as snapshots.refreshed in tenant 1''s trail.';

CREATE OR REPLACE FUNCTION dlw_admin.quota_drift()
RETURNS TABLE (tenant_id bigint, period date, metric text, snapshot_amount bigint, log_amount bigint, difference bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM dlw.quota_drift();
    PERFORM dlw.admin_audit((SELECT f.platform_tenant_id FROM dlw.domain_facts() f), 'snapshots.drift_checked', NULL, jsonb_build_object('via', 'dlw_admin.quota_drift'));
END
$$;
COMMENT ON FUNCTION dlw_admin.quota_drift() IS
    'Recomputes every tenant''s folded usage from the log and returns the (tenant, month) rows whose snapshot differs; no rows = no drift. Read-only apart from its audit row (snapshots.drift_checked, tenant 1).';

-- ---------------------------------------------------------------------------------------
-- Privileges: members of dlw_admin call every dlw_admin function; nobody else does.
-- ---------------------------------------------------------------------------------------
DO $grants$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = 'dlw_admin'::regnamespace
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO dlw_admin', fn);
    END LOOP;
END
$grants$;

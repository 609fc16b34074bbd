-- Administration through the API. Tenant-level work (users, service accounts) runs with the
-- caller's rights under RLS, so a tenant admin can only ever touch their own tenant.
-- Platform-level work (creating and changing tenants) must write rows of a tenant that is not
-- the caller's, so it runs in SECURITY DEFINER functions that check the acting role first.

CREATE OR REPLACE FUNCTION dlw.audit(p_action text, p_target text, p_detail jsonb DEFAULT '{}'::jsonb)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog
AS $$
    INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
    VALUES (dlw.ctx_tenant_id(), dlw.ctx_user_id(), p_action, p_target, coalesce(p_detail, '{}'::jsonb));
$$;
COMMENT ON FUNCTION dlw.audit(text, text, jsonb) IS
    'Appends an audit row to the current tenant''s trail, as the current actor (tenant context required).';

CREATE OR REPLACE FUNCTION dlw.set_user_role(p_user_id uuid, p_role text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
DECLARE
    v_old text;
    v_admins integer;
BEGIN
    IF p_role NOT IN ('tenant_admin', 'tenant_operator', 'tenant_viewer') THEN
        RETURN 'ROLE_NOT_ASSIGNABLE';
    END IF;
    -- Lock the tenant's admins first: two admins demoting each other at once serialise here,
    -- and the second sees the first's demotion, so a tenant never loses its last admin.
    PERFORM 1 FROM dlw.users u WHERE u.tenant_id = dlw.ctx_tenant_id() AND u.role = 'tenant_admin' FOR UPDATE;
    SELECT u.role INTO v_old FROM dlw.users u WHERE u.tenant_id = dlw.ctx_tenant_id() AND u.id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'NOT_FOUND';
    END IF;
    IF v_old = 'tenant_admin' AND p_role <> 'tenant_admin' THEN
        SELECT count(*) INTO v_admins FROM dlw.users u
        WHERE u.tenant_id = dlw.ctx_tenant_id() AND u.role = 'tenant_admin';
        IF v_admins <= 1 THEN
            RETURN 'LAST_TENANT_ADMIN';
        END IF;
    END IF;
    UPDATE dlw.users u SET role = p_role WHERE u.tenant_id = dlw.ctx_tenant_id() AND u.id = p_user_id;
    PERFORM dlw.audit('user.role_changed', p_user_id::text, jsonb_build_object('from', v_old, 'to', p_role));
    RETURN 'ok';
END
$$;
COMMENT ON FUNCTION dlw.set_user_role(uuid, text) IS
    'Changes a user''s role within the current tenant (never above tenant_admin, never demoting the last tenant_admin). Returns ok | NOT_FOUND | LAST_TENANT_ADMIN | ROLE_NOT_ASSIGNABLE.';

SET ROLE dlw_system;

CREATE OR REPLACE FUNCTION dlw.platform_create_tenant(
    p_slug text, p_display_name text, p_quota_concurrent integer, p_quota_bytes_month bigint, p_quota_storage_gb integer
) RETURNS TABLE (outcome text, tenant_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF dlw.ctx_role() IS DISTINCT FROM 'system_admin' THEN
        RAISE EXCEPTION 'only a system_admin creates tenants' USING ERRCODE = '42501';
    END IF;
    -- Claim the slug first: of two concurrent creates of one slug, exactly one inserts.
    INSERT INTO dlw.tenants AS t (slug, display_name, quota_concurrent, quota_bytes_month, quota_storage_gb)
    VALUES (p_slug, p_display_name, p_quota_concurrent, p_quota_bytes_month, p_quota_storage_gb)
    ON CONFLICT (slug) DO NOTHING
    RETURNING t.tenant_id INTO v_id;
    IF v_id IS NULL THEN
        RETURN QUERY SELECT 'TENANT_EXISTS'::text, NULL::bigint;
        RETURN;
    END IF;
    PERFORM dlw.provision_tenant(p_slug, p_display_name);  -- adds the default project and target
    INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
    VALUES (v_id, dlw.ctx_user_id(), 'tenant.created', v_id::text,
            jsonb_build_object('slug', p_slug, 'by_tenant', dlw.ctx_tenant_id()));
    RETURN QUERY SELECT 'created'::text, v_id;
END
$$;
COMMENT ON FUNCTION dlw.platform_create_tenant(text, text, integer, bigint, integer) IS
    'system_admin only (checked from the trusted API context): creates a tenant with its default project and storage target. Outcome created | TENANT_EXISTS.';

CREATE OR REPLACE FUNCTION dlw.platform_update_tenant(
    p_tenant_id bigint, p_quota_concurrent integer, p_quota_bytes_month bigint, p_quota_storage_gb integer,
    p_active boolean, p_display_name text
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before dlw.tenants%ROWTYPE;
    v_after  dlw.tenants%ROWTYPE;
BEGIN
    IF dlw.ctx_role() IS DISTINCT FROM 'system_admin' THEN
        RAISE EXCEPTION 'only a system_admin changes tenants' USING ERRCODE = '42501';
    END IF;
    SELECT * INTO v_before FROM dlw.tenants t WHERE t.tenant_id = p_tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'NOT_FOUND';
    END IF;
    IF p_tenant_id = 1 AND p_active IS FALSE THEN
        RETURN 'PLATFORM_TENANT';  -- the service token acts in tenant 1; it cannot be switched off
    END IF;
    UPDATE dlw.tenants t SET
        quota_concurrent  = coalesce(p_quota_concurrent, t.quota_concurrent),
        quota_bytes_month = coalesce(p_quota_bytes_month, t.quota_bytes_month),
        quota_storage_gb  = coalesce(p_quota_storage_gb, t.quota_storage_gb),
        active            = coalesce(p_active, t.active),
        display_name      = coalesce(p_display_name, t.display_name),
        updated_at        = now()
    WHERE t.tenant_id = p_tenant_id
    RETURNING * INTO v_after;
    INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
    VALUES (p_tenant_id, dlw.ctx_user_id(), 'tenant.updated', p_tenant_id::text,
            jsonb_build_object('before', to_jsonb(v_before) - 'created_at' - 'updated_at',
                               'after', to_jsonb(v_after) - 'created_at' - 'updated_at'));
    RETURN 'ok';
END
$$;
COMMENT ON FUNCTION dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text) IS
    'system_admin only: changes a tenant''s limits (0 = unlimited), active flag or display name; NULL keeps a value. Returns ok | NOT_FOUND | PLATFORM_TENANT (tenant 1 cannot be deactivated).';

REVOKE ALL ON FUNCTION dlw.platform_create_tenant(text, text, integer, bigint, integer),
    dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.platform_create_tenant(text, text, integer, bigint, integer),
    dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text) TO dlw_app;

SET ROLE dlw_owner;

REVOKE ALL ON FUNCTION dlw.audit(text, text, jsonb), dlw.set_user_role(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.audit(text, text, jsonb), dlw.set_user_role(uuid, text) TO dlw_app;

-- Grants reach running API instances through NOTIFY: each instance LISTENs and reloads.
CREATE OR REPLACE FUNCTION dlw.notify_casbin_rule_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM pg_notify('dlw_casbin_rule', TG_OP);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.notify_casbin_rule_changed() IS
    'Statement trigger on dlw.casbin_rule: NOTIFY dlw_casbin_rule so every API instance reloads its enforcer.';

CREATE OR REPLACE TRIGGER casbin_rule_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dlw.casbin_rule
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();

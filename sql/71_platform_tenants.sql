-- owner: dlw_system
-- Platform administration through the API: creating and changing tenants writes rows of a
-- tenant that is not the caller's, so these are SECURITY DEFINER functions owned by dlw_system
-- that refuse unless the trusted context's role is system_admin. Tenant creation itself is
-- dlw.tenant_create (sql/20_tenants.sql), shared with dlw_admin.create_tenant.


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
    -- Of two concurrent creates of one slug, exactly one gets an id.
    v_id := dlw.tenant_create(p_slug, p_display_name, p_quota_concurrent, p_quota_bytes_month, p_quota_storage_gb);
    IF v_id IS NULL THEN
        RETURN QUERY SELECT 'TENANT_EXISTS'::text, NULL::bigint;
        RETURN;
    END IF;
    PERFORM dlw.audit_append(v_id, dlw.ctx_user_id(), 'tenant.created', v_id::text,
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
    IF p_tenant_id = (SELECT f.platform_tenant_id FROM dlw.domain_facts() f) AND p_active IS FALSE THEN
        RETURN 'PLATFORM_TENANT';  -- the service token acts in the platform tenant; it cannot be switched off
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
    PERFORM dlw.audit_append(p_tenant_id, dlw.ctx_user_id(), 'tenant.updated', p_tenant_id::text,
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

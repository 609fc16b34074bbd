-- Tenant provisioning: a tenant never exists without its default project and its `default`
-- storage target. Invoker rights: only roles that bypass RLS (dlw_system, which owns the
-- administration functions, or a superuser) can run it; nobody else holds EXECUTE.

CREATE OR REPLACE FUNCTION dlw.provision_tenant(
    p_slug text,
    p_display_name text,
    p_quota_concurrent integer DEFAULT NULL,
    p_quota_bytes_month bigint DEFAULT NULL,
    p_quota_storage_gb integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
DECLARE
    v_tenant_id bigint;
BEGIN
    INSERT INTO dlw.tenants (slug, display_name, quota_concurrent, quota_bytes_month, quota_storage_gb)
    VALUES (p_slug, p_display_name,
            coalesce(p_quota_concurrent, 10),
            coalesce(p_quota_bytes_month, 1099511627776),
            coalesce(p_quota_storage_gb, 1024))
    ON CONFLICT (slug) DO NOTHING
    RETURNING tenant_id INTO v_tenant_id;
    IF v_tenant_id IS NULL THEN
        SELECT tenant_id INTO STRICT v_tenant_id FROM dlw.tenants WHERE slug = p_slug;
    END IF;
    INSERT INTO dlw.projects (tenant_id, name, is_default) VALUES (v_tenant_id, 'default', true)
    ON CONFLICT DO NOTHING;
    INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (v_tenant_id, 'default')
    ON CONFLICT DO NOTHING;
    RETURN v_tenant_id;
END
$$;
COMMENT ON FUNCTION dlw.provision_tenant(text, text, integer, bigint, integer) IS
    'Creates a tenant (or finds it by slug) with its default project and default storage target; returns its id. Idempotent.';
REVOKE ALL ON FUNCTION dlw.provision_tenant(text, text, integer, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.provision_tenant(text, text, integer, bigint, integer) TO dlw_system;

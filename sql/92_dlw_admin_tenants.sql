-- owner: dlw_system
-- dlw_admin: tenants (create, rename, deactivate, reactivate, limits, list). See
-- sql/91_dlw_admin_helpers.sql for the conventions and error codes.

-- ---------------------------------------------------------------------------------------
-- Tenants
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw_admin.create_tenant(
    slug text,
    display_name text,
    quota_concurrent integer DEFAULT NULL,
    quota_bytes_month bigint DEFAULT NULL,
    quota_storage_gb integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slug  text := create_tenant.slug;
    v_name  text := create_tenant.display_name;
    v_id    bigint;
BEGIN
    -- Validates (22023), then claims the slug: a concurrent creation of the same slug waits
    -- there, then gets NULL here and DLWA2.
    v_id := dlw.tenant_create(v_slug, v_name, create_tenant.quota_concurrent, create_tenant.quota_bytes_month,
                              create_tenant.quota_storage_gb);
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'tenant % already exists', quote_literal(v_slug) USING ERRCODE = 'DLWA2';
    END IF;
    PERFORM dlw.admin_audit(v_id, 'tenant.created', v_id::text,
        (SELECT jsonb_build_object('via', 'dlw_admin.create_tenant', 'slug', t.slug, 'display_name', t.display_name,
                                   'quota_concurrent', t.quota_concurrent, 'quota_bytes_month', t.quota_bytes_month,
                                   'quota_storage_gb', t.quota_storage_gb)
           FROM dlw.tenants t WHERE t.tenant_id = v_id));
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION dlw_admin.create_tenant(text, text, integer, bigint, integer) IS
$c$Creates a tenant with its default project and "default" storage target; returns its id. Limits: NULL = the defaults (10 live tasks, 1 TiB per month, 1024 GB), 0 = unlimited. Audited as tenant.created.
Raises 22023 (invalid slug or display name, negative limit), DLWA2 (slug taken).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.rename_tenant(tenant_slug text, display_name text, new_slug text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id     bigint := dlw.admin_tenant_id(rename_tenant.tenant_slug);
    v_name   text := rename_tenant.display_name;
    v_slug   text := rename_tenant.new_slug;
    v_before jsonb;
    v_after  jsonb;
BEGIN
    IF v_name IS NOT NULL AND length(v_name) NOT BETWEEN 1 AND (SELECT f.display_name_max_length FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'display name must be 1 to % characters', (SELECT f.display_name_max_length FROM dlw.domain_facts() f)
            USING ERRCODE = '22023';
    END IF;
    IF v_slug IS NOT NULL THEN
        PERFORM dlw.admin_check_slug(v_slug);
    END IF;
    SELECT jsonb_build_object('slug', t.slug, 'display_name', t.display_name) INTO v_before
      FROM dlw.tenants t WHERE t.tenant_id = v_id FOR UPDATE;
    BEGIN
        UPDATE dlw.tenants t
           SET display_name = coalesce(v_name, t.display_name),
               slug = coalesce(v_slug, t.slug),
               updated_at = now()
         WHERE t.tenant_id = v_id
        RETURNING jsonb_build_object('slug', t.slug, 'display_name', t.display_name) INTO v_after;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'tenant % already exists', quote_literal(v_slug) USING ERRCODE = 'DLWA2';
    END;
    PERFORM dlw.admin_audit(v_id, 'tenant.renamed', v_id::text,
        jsonb_build_object('via', 'dlw_admin.rename_tenant', 'before', v_before, 'after', v_after));
END
$$;
COMMENT ON FUNCTION dlw_admin.rename_tenant(text, text, text) IS
$c$Changes a tenant's display name and, when new_slug is given, its slug (NULL keeps a value). A new slug breaks tenant rules (DLW_AUTH_TENANT_RULES_JSON) and X-DLW-Tenant headers that name the old one. Audited as tenant.renamed.
Raises DLWA1 (no such tenant), 22023 (invalid name or slug), DLWA2 (new slug taken).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.deactivate_tenant(tenant_slug text, reason text DEFAULT NULL)
RETURNS TABLE (tasks_cancelled bigint, files_cancelled bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id      bigint := dlw.admin_tenant_id(deactivate_tenant.tenant_slug);
    v_stopped record;
BEGIN
    -- The one deactivation (sql/71_platform_tenants.sql), shared with the API's.
    SELECT * INTO v_stopped FROM dlw.deactivate_tenant_in(v_id, session_user, 'dlw_admin.deactivate_tenant');
    PERFORM dlw.admin_audit(v_id, 'tenant.deactivated', v_id::text,
        jsonb_build_object('via', 'dlw_admin.deactivate_tenant', 'reason', deactivate_tenant.reason,
                           'was_active', v_stopped.was_active, 'tasks_cancelled', v_stopped.tasks_cancelled,
                           'files_cancelled', v_stopped.files_cancelled));
    RETURN QUERY SELECT v_stopped.tasks_cancelled, v_stopped.files_cancelled;
END
$$;
COMMENT ON FUNCTION dlw_admin.deactivate_tenant(text, text) IS
$c$Deactivates a tenant: its users' logins and service tokens are refused (TENANT_INACTIVE), new tasks are refused (outcome TENANT_INACTIVE, HTTP 403), and its pending and running tasks and their unfinished files are cancelled (leases invalidated), each with a task.cancelled audit row. Its data stays readable, by its reporting logins too. Returns the numbers of tasks and files cancelled; running it again cancels nothing more. Audited as tenant.deactivated (with the reason).
Raises DLWA1 (no such tenant), DLWA6 (tenant 1, the platform tenant).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.reactivate_tenant(tenant_slug text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id  bigint := dlw.admin_tenant_id(reactivate_tenant.tenant_slug);
    v_was boolean;
BEGIN
    SELECT t.active INTO v_was FROM dlw.tenants t WHERE t.tenant_id = v_id FOR UPDATE;
    UPDATE dlw.tenants t SET active = true, updated_at = now() WHERE t.tenant_id = v_id;
    PERFORM dlw.admin_audit(v_id, 'tenant.reactivated', v_id::text,
        jsonb_build_object('via', 'dlw_admin.reactivate_tenant', 'was_active', v_was));
END
$$;
COMMENT ON FUNCTION dlw_admin.reactivate_tenant(text) IS
    'Reactivates a tenant: logins and new tasks are accepted again (tasks cancelled by the deactivation stay cancelled). Audited as tenant.reactivated. Raises DLWA1 (no such tenant).';

CREATE OR REPLACE FUNCTION dlw_admin.set_quota(
    tenant_slug text,
    quota_concurrent integer DEFAULT NULL,
    quota_bytes_month bigint DEFAULT NULL,
    quota_storage_gb integer DEFAULT NULL
) RETURNS TABLE (concurrent_limit integer, bytes_month_limit bigint, storage_gb_limit integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id          bigint := dlw.admin_tenant_id(set_quota.tenant_slug);
    v_concurrent  integer := set_quota.quota_concurrent;
    v_bytes       bigint := set_quota.quota_bytes_month;
    v_storage     integer := set_quota.quota_storage_gb;
    v_before      jsonb;
    v_after       dlw.tenants%ROWTYPE;
BEGIN
    PERFORM dlw.admin_check_limits(v_concurrent, v_bytes, v_storage);
    SELECT jsonb_build_object('quota_concurrent', t.quota_concurrent, 'quota_bytes_month', t.quota_bytes_month,
                              'quota_storage_gb', t.quota_storage_gb)
      INTO v_before FROM dlw.tenants t WHERE t.tenant_id = v_id FOR UPDATE;
    UPDATE dlw.tenants t
       SET quota_concurrent = coalesce(v_concurrent, t.quota_concurrent),
           quota_bytes_month = coalesce(v_bytes, t.quota_bytes_month),
           quota_storage_gb = coalesce(v_storage, t.quota_storage_gb),
           updated_at = now()
     WHERE t.tenant_id = v_id
    RETURNING t.* INTO v_after;
    PERFORM dlw.admin_audit(v_id, 'tenant.quota_set', v_id::text,
        jsonb_build_object('via', 'dlw_admin.set_quota', 'before', v_before,
                           'after', jsonb_build_object('quota_concurrent', v_after.quota_concurrent,
                                                       'quota_bytes_month', v_after.quota_bytes_month,
                                                       'quota_storage_gb', v_after.quota_storage_gb)));
    RETURN QUERY SELECT v_after.quota_concurrent, v_after.quota_bytes_month, v_after.quota_storage_gb;
END
$$;
COMMENT ON FUNCTION dlw_admin.set_quota(text, integer, bigint, integer) IS
$c$Sets a tenant's limits: live tasks, bytes per UTC month, storage GB. NULL keeps a limit, 0 = unlimited; the next task admission uses the new values (tasks already admitted stay). Returns the limits now in force (concurrent_limit, bytes_month_limit, storage_gb_limit). Audited as tenant.quota_set (before and after).
Raises DLWA1 (no such tenant), 22023 (negative limit).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.list_tenants()
RETURNS TABLE (
    tenant_id          bigint,
    slug               text,
    display_name       text,
    active             boolean,
    live_tasks         bigint,
    quota_concurrent   integer,
    bytes_used_month   bigint,
    quota_bytes_month  bigint,
    bytes_used_pct     numeric,
    quota_storage_gb   integer,
    reporting_logins   bigint,
    created_at         timestamptz
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_period date := dlw.month_start(now());
BEGIN
    PERFORM dlw.admin_audit((SELECT f.platform_tenant_id FROM dlw.domain_facts() f), 'admin.tenants_listed', NULL, jsonb_build_object('via', 'dlw_admin.list_tenants'));
    RETURN QUERY
    SELECT t.tenant_id, t.slug, t.display_name, t.active,
           (SELECT count(*) FROM dlw.tasks x WHERE x.tenant_id = t.tenant_id AND x.status IN ('pending', 'running')),
           t.quota_concurrent,
           b.used,
           t.quota_bytes_month,
           CASE WHEN t.quota_bytes_month > 0 THEN round(100.0 * b.used / t.quota_bytes_month, 2) END,
           t.quota_storage_gb,
           (SELECT count(*) FROM dlw.reporting_logins r WHERE r.tenant_id = t.tenant_id),
           t.created_at
      FROM dlw.tenants t
     CROSS JOIN LATERAL (SELECT dlw.bytes_used_month(t.tenant_id, v_period) AS used) b
     ORDER BY t.tenant_id;
END
$$;
COMMENT ON FUNCTION dlw_admin.list_tenants() IS
    'Every tenant with its usage against its limits: live (pending/running) tasks vs quota_concurrent, bytes used this UTC month (exactly as admission counts them) vs quota_bytes_month (bytes_used_pct NULL = unlimited), storage allowance, number of reporting logins. Audited as admin.tenants_listed in the platform tenant (1).';

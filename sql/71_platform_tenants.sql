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


-- ---------------------------------------------------------------------------------------
-- Deactivation, shared by the API (dlw.platform_update_tenant with active = false) and the
-- DBA (dlw_admin.deactivate_tenant, sql/92_dlw_admin_tenants.sql): one way to stop a tenant.
-- Lock order: the tenant's quota rows first (the lock dlw.create_task holds until it commits,
-- so an admission in flight finishes first and its task is cancelled here; one that starts
-- later sees the tenant inactive), then the tenant row. The other way round would deadlock
-- with an admission, whose task INSERT takes a key-share lock on the tenant row (foreign key)
-- while it holds the quota rows.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.deactivate_tenant_in(p_tenant_id bigint, p_actor text, p_via text)
RETURNS TABLE (was_active boolean, tasks_cancelled bigint, files_cancelled bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_was   boolean;
    v_tasks bigint;
    v_files bigint;
BEGIN
    IF p_tenant_id = (SELECT f.platform_tenant_id FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'the platform tenant (id 1) cannot be deactivated' USING ERRCODE = 'DLWA6',
            DETAIL = 'the service token and system_admin principals act in tenant 1';
    END IF;
    PERFORM dlw.lock_tenant_quota_rows(p_tenant_id);
    SELECT t.active INTO v_was FROM dlw.tenants t WHERE t.tenant_id = p_tenant_id FOR UPDATE;
    UPDATE dlw.tenants t SET active = false, updated_at = now() WHERE t.tenant_id = p_tenant_id;

    -- Files first, then tasks (the order in which executors update them). Clearing the
    -- assignment token and lease invalidates every executor lease.
    v_files := dlw.cancel_unfinished_files(p_tenant_id, NULL, NULL, 'tenant deactivated');
    WITH live AS (
        SELECT x.id, x.status FROM dlw.tasks x
         WHERE x.tenant_id = p_tenant_id AND x.status IN ('pending', 'running')
           FOR UPDATE
    ), cancelled AS (
        UPDATE dlw.tasks x
           SET status = 'cancelled', error = coalesce(x.error, 'tenant deactivated')
          FROM live
         WHERE x.tenant_id = p_tenant_id AND x.id = live.id
        RETURNING x.id, live.status AS previous_status
    )
    SELECT count(dlw.audit_append(p_tenant_id, p_actor, 'task.cancelled', c.id::text,
                 jsonb_build_object('previous_status', c.previous_status, 'reason', 'tenant deactivated',
                                    'via', p_via)))
      INTO v_tasks
      FROM cancelled c;
    RETURN QUERY SELECT v_was, v_tasks, v_files;
END
$$;
COMMENT ON FUNCTION dlw.deactivate_tenant_in(bigint, text, text) IS
    'Internal (dlw_system''s definer functions only): deactivates a tenant exactly, for dlw.platform_update_tenant (API) and dlw_admin.deactivate_tenant (DBA): takes its quota rows (serialising with dlw.create_task) and then its row, sets active = false, cancels its unfinished files (leases dropped) and its pending and running tasks, each with a task.cancelled audit row by p_actor (detail via p_via). Returns (was_active, tasks_cancelled, files_cancelled). Raises DLWA6 for the platform tenant.';

CREATE OR REPLACE FUNCTION dlw.platform_update_tenant(
    p_tenant_id bigint, p_quota_concurrent integer, p_quota_bytes_month bigint, p_quota_storage_gb integer,
    p_active boolean, p_display_name text
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_before  dlw.tenants%ROWTYPE;
    v_after   dlw.tenants%ROWTYPE;
    v_stopped jsonb := '{}'::jsonb;  -- the counts of a deactivation, for the audit row
BEGIN
    IF dlw.ctx_role() IS DISTINCT FROM 'system_admin' THEN
        RAISE EXCEPTION 'only a system_admin changes tenants' USING ERRCODE = '42501';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM dlw.tenants t WHERE t.tenant_id = p_tenant_id) THEN
        RETURN 'NOT_FOUND';
    END IF;
    IF p_tenant_id = (SELECT f.platform_tenant_id FROM dlw.domain_facts() f) AND p_active IS FALSE THEN
        RETURN 'PLATFORM_TENANT';  -- the service token acts in the platform tenant; it cannot be switched off
    END IF;
    -- A deactivation is dlw.deactivate_tenant_in's, which locks the quota rows before the tenant
    -- row (the order admission needs); take them first here too, before the row below.
    IF p_active IS FALSE THEN
        PERFORM dlw.lock_tenant_quota_rows(p_tenant_id);
    END IF;
    SELECT * INTO v_before FROM dlw.tenants t WHERE t.tenant_id = p_tenant_id FOR UPDATE;
    IF p_active IS FALSE THEN
        SELECT jsonb_build_object('tasks_cancelled', d.tasks_cancelled, 'files_cancelled', d.files_cancelled)
          INTO v_stopped
          FROM dlw.deactivate_tenant_in(p_tenant_id, dlw.ctx_user_id(), 'api') d;
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
                           'after', to_jsonb(v_after) - 'created_at' - 'updated_at') || v_stopped);
    RETURN 'ok';
END
$$;
COMMENT ON FUNCTION dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text) IS
    'system_admin only: changes a tenant''s limits (0 = unlimited), active flag or display name; NULL keeps a value. active = false deactivates exactly as dlw_admin.deactivate_tenant does (dlw.deactivate_tenant_in: serialised with admission on the quota rows, live tasks and files cancelled, leases dropped; the counts in the tenant.updated audit row). Returns ok | NOT_FOUND | PLATFORM_TENANT (tenant 1 cannot be deactivated).';

REVOKE ALL ON FUNCTION dlw.platform_create_tenant(text, text, integer, bigint, integer),
    dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text),
    dlw.deactivate_tenant_in(bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.platform_create_tenant(text, text, integer, bigint, integer),
    dlw.platform_update_tenant(bigint, integer, bigint, integer, boolean, text) TO dlw_app;

-- owner: dlw_owner
-- Tenant provisioning: a tenant never exists without its default project and its `default`
-- storage target. Every path that creates a tenant (dlw.provision_tenant for dev and tests,
-- dlw.platform_create_tenant for the API, dlw_admin.create_tenant for DBAs) goes through
-- dlw.tenant_create, so all of them validate alike and take the same defaults (the column
-- defaults of dlw.tenants); each caller writes its own audit row, with its own actor.
-- Invoker rights: only roles that bypass RLS (dlw_system, which owns the administration
-- functions, or a superuser) can run these; nobody else holds EXECUTE.

CREATE OR REPLACE FUNCTION dlw.tenant_add_defaults(p_tenant_id bigint) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO dlw.projects (tenant_id, name, is_default) VALUES (p_tenant_id, 'default', true)
    ON CONFLICT DO NOTHING;
    INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (p_tenant_id, 'default')
    ON CONFLICT DO NOTHING;
$$;
COMMENT ON FUNCTION dlw.tenant_add_defaults(bigint) IS
    'Adds a tenant''s default project and its "default" storage target unless they exist.';

CREATE OR REPLACE FUNCTION dlw.tenant_create(
    p_slug text,
    p_display_name text,
    p_quota_concurrent integer DEFAULT NULL,
    p_quota_bytes_month bigint DEFAULT NULL,
    p_quota_storage_gb integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    -- The checks are dlw_system's (sql/91_dlw_admin_helpers.sql), which every caller is.
    PERFORM dlw.admin_check_slug(p_slug);
    IF p_display_name IS NULL
       OR length(p_display_name) NOT BETWEEN 1 AND (SELECT f.display_name_max_length FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'display name must be 1 to % characters', (SELECT f.display_name_max_length FROM dlw.domain_facts() f)
            USING ERRCODE = '22023';
    END IF;
    PERFORM dlw.admin_check_limits(p_quota_concurrent, p_quota_bytes_month, p_quota_storage_gb);
    -- Claim the slug first: of two concurrent creates of one slug, exactly one inserts (the
    -- other waits here, then gets NULL). Limits not given keep the column defaults.
    INSERT INTO dlw.tenants AS t (slug, display_name) VALUES (p_slug, p_display_name)
    ON CONFLICT (dlw.cross_tenant_key(slug)) DO NOTHING  -- tenants_slug_cross_tenant
    RETURNING t.tenant_id INTO v_id;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_quota_concurrent IS NOT NULL OR p_quota_bytes_month IS NOT NULL OR p_quota_storage_gb IS NOT NULL THEN
        UPDATE dlw.tenants t
           SET quota_concurrent  = coalesce(p_quota_concurrent, t.quota_concurrent),
               quota_bytes_month = coalesce(p_quota_bytes_month, t.quota_bytes_month),
               quota_storage_gb  = coalesce(p_quota_storage_gb, t.quota_storage_gb)
         WHERE t.tenant_id = v_id;
    END IF;
    PERFORM dlw.tenant_add_defaults(v_id);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION dlw.tenant_create(text, text, integer, bigint, integer) IS
    'The one way a tenant is created: validates slug, display name and limits (22023), claims the slug, applies the given limits (NULL = the column default of dlw.tenants), adds the default project and storage target. Returns the new id, or NULL when the slug is taken. Writes no audit row: each caller does, as its actor.';

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
    v_tenant_id := dlw.tenant_create(p_slug, p_display_name, p_quota_concurrent, p_quota_bytes_month,
                                     p_quota_storage_gb);
    IF v_tenant_id IS NULL THEN
        SELECT tenant_id INTO STRICT v_tenant_id FROM dlw.tenants
         WHERE dlw.cross_tenant_key(slug) = dlw.cross_tenant_key(p_slug);
        PERFORM dlw.tenant_add_defaults(v_tenant_id);
    END IF;
    RETURN v_tenant_id;
END
$$;
COMMENT ON FUNCTION dlw.provision_tenant(text, text, integer, bigint, integer) IS
    'Creates a tenant (or finds it by slug) with its default project and default storage target; returns its id. Idempotent.';

-- ---------------------------------------------------------------------------------------
-- Storage-target limits, for every writer (the API, provisioning, a superuser): a tenant has at
-- most quota_storage_targets targets (0 = unlimited), and no config is larger than
-- dlw.domain_facts().storage_target_config_max_bytes.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.storage_target_limits() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_max_bytes integer := (SELECT f.storage_target_config_max_bytes FROM dlw.domain_facts() f);
    v_bytes     integer := octet_length(NEW.config::text);
    v_limit     integer;
    v_count     bigint;
BEGIN
    IF v_bytes > v_max_bytes THEN
        RAISE EXCEPTION 'storage target config is % bytes, at most % are allowed', v_bytes, v_max_bytes
            USING ERRCODE = 'DLW03';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.tenant_id = OLD.tenant_id THEN
        RETURN NEW;
    END IF;
    -- RLS: a dlw_app caller reads its own tenant's row only (another tenant's insert reads NULL
    -- here and is refused by the insert policy anyway).
    SELECT t.quota_storage_targets INTO v_limit FROM dlw.tenants t WHERE t.tenant_id = NEW.tenant_id;
    IF v_limit > 0 THEN
        -- Race-free: inserts into one tenant queue on this transaction lock until the holder
        -- commits, and the count below is a later statement, so at READ COMMITTED it sees every
        -- target they committed (SERIALIZABLE catches the rest; REPEATABLE READ would not). Only
        -- the platform's roles may take advisory locks (dlw.secure_database()).
        IF current_setting('transaction_isolation') = 'repeatable read' THEN
            RAISE EXCEPTION 'storage targets cannot be added at REPEATABLE READ' USING ERRCODE = '25000';
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended('dlw.storage_targets', NEW.tenant_id));
        SELECT count(*) INTO v_count FROM dlw.storage_targets s WHERE s.tenant_id = NEW.tenant_id;
        IF v_count + 1 > v_limit THEN
            RAISE EXCEPTION 'tenant % has % storage targets, its limit', NEW.tenant_id, v_count
                USING ERRCODE = 'DLW02';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.storage_target_limits() IS
    'Trigger of dlw.storage_targets (before insert, or an update of config or tenant_id): raises DLW03 when the config (as JSON text) exceeds dlw.domain_facts().storage_target_config_max_bytes, and DLW02 when the tenant already has quota_storage_targets targets (0 = unlimited), counted under a per-tenant transaction advisory lock (25000 at REPEATABLE READ, where the count could miss a rival).';

CREATE OR REPLACE TRIGGER storage_targets_limits
    BEFORE INSERT OR UPDATE OF config, tenant_id ON dlw.storage_targets
    FOR EACH ROW EXECUTE FUNCTION dlw.storage_target_limits();
COMMENT ON TRIGGER storage_targets_limits ON dlw.storage_targets IS
    'Storage-target count and config size limits: see dlw.storage_target_limits()';
REVOKE ALL ON FUNCTION dlw.storage_target_limits() FROM PUBLIC;

REVOKE ALL ON FUNCTION dlw.tenant_add_defaults(bigint),
    dlw.tenant_create(text, text, integer, bigint, integer),
    dlw.provision_tenant(text, text, integer, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.tenant_add_defaults(bigint),
    dlw.tenant_create(text, text, integer, bigint, integer),
    dlw.provision_tenant(text, text, integer, bigint, integer) TO dlw_system;

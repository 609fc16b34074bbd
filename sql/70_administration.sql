-- owner: dlw_owner
-- Administration through the API. Tenant-level work (users, service accounts) runs with the
-- caller's rights under RLS, so a tenant admin can only ever touch their own tenant.
-- Platform-level work (creating and changing tenants) must write rows of a tenant that is not
-- the caller's, so it runs in SECURITY DEFINER functions that check the acting role first
-- (sql/71_platform_tenants.sql). The audit helpers are in sql/02_audit.sql.

CREATE OR REPLACE FUNCTION dlw.set_user_role(p_user_id uuid, p_role text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
DECLARE
    v_old text;
    v_admins integer;
BEGIN
    IF p_role IS NULL OR NOT p_role = ANY ((SELECT f.tenant_roles FROM dlw.domain_facts() f)::text[]) THEN
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

REVOKE ALL ON FUNCTION dlw.set_user_role(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.set_user_role(uuid, text) TO dlw_app;

-- Grants reach running API instances through NOTIFY, but a notification is only a hint: any
-- role that can connect may NOTIFY the same channel. The trigger bumps dlw.grant_version in the
-- changing transaction, so an instance that is notified reads the counter and reloads only
-- when it moved. The payload is empty: listeners learn that some grant changed, never which.
CREATE OR REPLACE FUNCTION dlw.notify_casbin_rule_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    UPDATE dlw.grant_version SET version = version + 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dlw.grant_version has no row: API instances would miss this change'
            USING ERRCODE = 'P0002';
    END IF;
    PERFORM pg_notify('dlw_casbin_rule', '');
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.notify_casbin_rule_changed() IS
    'Statement trigger on dlw.casbin_rule: bumps dlw.grant_version, then NOTIFY dlw_casbin_rule with an empty payload (delivered at commit), so every API instance checks the version and reloads its enforcer.';

CREATE OR REPLACE TRIGGER casbin_rule_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dlw.casbin_rule
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();
COMMENT ON TRIGGER casbin_rule_changed ON dlw.casbin_rule IS
    'Every change of dlw.casbin_rule bumps dlw.grant_version and reaches the API instances: see dlw.notify_casbin_rule_changed()';

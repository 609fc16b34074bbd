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
-- role that can connect may NOTIFY the same channel. The triggers bump dlw.grant_version in the
-- changing transaction, so an instance that is notified reads the counter and acts only when it
-- moved. The payload is empty: listeners learn that some grant changed, never which.
--
-- Each changing statement also records the rules it changed under the version it bumped to
-- (dlw.casbin_rule_changes), so an instance applies just those (work proportional to the
-- change, not to the 10,000 grants). Versions commit in order: the bump locks the counter row
-- until commit. The last CHANGES_KEPT versions are kept; a TRUNCATE records nothing and moves
-- changes_from past itself, so every instance reloads in full.
CREATE OR REPLACE FUNCTION dlw.notify_casbin_rule_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    v_version bigint;
    c_kept    CONSTANT bigint := 1000;  -- CHANGES_KEPT
BEGIN
    UPDATE dlw.grant_version SET version = version + 1 RETURNING version INTO v_version;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dlw.grant_version has no row: API instances would miss this change'
            USING ERRCODE = 'P0002';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM dlw.casbin_rule_changes;
        UPDATE dlw.grant_version SET changes_from = v_version + 1;
    ELSE
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            INSERT INTO dlw.casbin_rule_changes (version, ptype, v0, v1, v2, v3, v4, v5)
            SELECT v_version, n.ptype, n.v0, n.v1, n.v2, n.v3, n.v4, n.v5 FROM new_rows n;
        END IF;
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            INSERT INTO dlw.casbin_rule_changes (version, ptype, v0, v1, v2, v3, v4, v5)
            SELECT v_version, o.ptype, o.v0, o.v1, o.v2, o.v3, o.v4, o.v5 FROM old_rows o;
        END IF;
        IF v_version % 100 = 0 THEN  -- prune now and then (through the version index)
            DELETE FROM dlw.casbin_rule_changes c WHERE c.version <= v_version - c_kept;
            UPDATE dlw.grant_version SET changes_from = greatest(changes_from, v_version - c_kept + 1);
        END IF;
    END IF;
    PERFORM pg_notify('dlw_casbin_rule', '');
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.notify_casbin_rule_changed() IS
    'Statement triggers on dlw.casbin_rule: bump dlw.grant_version, record the changed rules under the new version in dlw.casbin_rule_changes (the last 1000 versions are kept; TRUNCATE records none and forces a full reload), then NOTIFY dlw_casbin_rule with an empty payload (delivered at commit), so every API instance checks the version and applies the changes.';

-- One trigger per event: transition tables (the changed rows) need it.
DROP TRIGGER IF EXISTS casbin_rule_changed ON dlw.casbin_rule;
CREATE OR REPLACE TRIGGER casbin_rule_inserted
    AFTER INSERT ON dlw.casbin_rule REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();
CREATE OR REPLACE TRIGGER casbin_rule_updated
    AFTER UPDATE ON dlw.casbin_rule REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();
CREATE OR REPLACE TRIGGER casbin_rule_deleted
    AFTER DELETE ON dlw.casbin_rule REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();
CREATE OR REPLACE TRIGGER casbin_rule_truncated
    AFTER TRUNCATE ON dlw.casbin_rule
    FOR EACH STATEMENT EXECUTE FUNCTION dlw.notify_casbin_rule_changed();
COMMENT ON TRIGGER casbin_rule_inserted ON dlw.casbin_rule IS
    'Every change of dlw.casbin_rule bumps dlw.grant_version and reaches the API instances: see dlw.notify_casbin_rule_changed()';
COMMENT ON TRIGGER casbin_rule_updated ON dlw.casbin_rule IS
    'Every change of dlw.casbin_rule bumps dlw.grant_version and reaches the API instances: see dlw.notify_casbin_rule_changed()';
COMMENT ON TRIGGER casbin_rule_deleted ON dlw.casbin_rule IS
    'Every change of dlw.casbin_rule bumps dlw.grant_version and reaches the API instances: see dlw.notify_casbin_rule_changed()';
COMMENT ON TRIGGER casbin_rule_truncated ON dlw.casbin_rule IS
    'Every change of dlw.casbin_rule bumps dlw.grant_version and reaches the API instances: see dlw.notify_casbin_rule_changed()';

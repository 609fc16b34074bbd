-- owner: dlw_system
-- dlw_admin: reporting logins (create, password, drop, list). See sql/91_dlw_admin_helpers.sql
-- for the conventions and error codes.

-- ---------------------------------------------------------------------------------------
-- Reporting logins
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw_admin.create_reporting_login(login text, tenant_slug text, password text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_login text := create_reporting_login.login;
    v_id    bigint := dlw.admin_tenant_id(create_reporting_login.tenant_slug);
BEGIN
    IF v_login IS NULL OR v_login !~ (SELECT f.login_name_pattern FROM dlw.domain_facts() f)
       OR v_login ~ (SELECT f.login_name_reserved_pattern FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'invalid login name %', coalesce(quote_literal(v_login), 'NULL') USING ERRCODE = '22023',
            HINT = 'lowercase letters, digits and _ . @ -, starting with a letter or _, at most 63; not pg_* or dlw_*';
    END IF;
    IF EXISTS (SELECT 1 FROM dlw.reporting_logins r WHERE r.login = v_login) THEN
        RAISE EXCEPTION 'login % is already a reporting login', quote_ident(v_login) USING ERRCODE = 'DLWA3';
    END IF;
    PERFORM dlw.create_login_role(v_login, create_reporting_login.password);
    INSERT INTO dlw.reporting_logins (tenant_id, login, managed_role) VALUES (v_id, v_login, true);
    PERFORM dlw.admin_audit(v_id, 'reporting_login.created', v_login,
        jsonb_build_object('via', 'dlw_admin.create_reporting_login',
                           'authentication', CASE WHEN create_reporting_login.password IS NULL
                                                  THEN 'certificate or peer (no password)' ELSE 'password' END));
END
$$;
COMMENT ON FUNCTION dlw_admin.create_reporting_login(text, text, text) IS
$c$Creates a database login for BI tools and analysts that sees only this tenant's rows: CREATE ROLE <login> LOGIN IN ROLE dlw_reporting, mapped to the tenant in dlw.reporting_logins. password NULL = no password: the login then authenticates by client certificate (CN = login) or peer/ident, per pg_hba.conf. A password may also be given as a SCRAM-SHA-256 verifier. Audited as reporting_login.created (never the password).
Raises DLWA1 (no such tenant), 22023 (invalid login name), DLWA3 (a role of that name exists in the cluster).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.set_reporting_login_password(login text, password text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_login   text := set_reporting_login_password.login;
    v_map     dlw.reporting_logins%ROWTYPE;
BEGIN
    SELECT * INTO v_map FROM dlw.reporting_logins r WHERE r.login = v_login FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a reporting login of this database', coalesce(quote_ident(v_login), 'NULL')
            USING ERRCODE = 'DLWA4';
    END IF;
    IF NOT v_map.managed_role THEN
        RAISE EXCEPTION 'role % was not created by dlw_admin.create_reporting_login; a superuser manages it',
            quote_ident(v_login) USING ERRCODE = 'DLWA7';
    END IF;
    PERFORM dlw.set_login_role_password(v_login, set_reporting_login_password.password);
    PERFORM dlw.admin_audit(v_map.tenant_id, 'reporting_login.password_set', v_login,
        jsonb_build_object('via', 'dlw_admin.set_reporting_login_password',
                           'password_removed', set_reporting_login_password.password IS NULL));
END
$$;
COMMENT ON FUNCTION dlw_admin.set_reporting_login_password(text, text) IS
$c$Sets (rotates) the password of a reporting login created by dlw_admin.create_reporting_login; NULL removes it (certificate/peer authentication only). Open sessions stay connected. Audited as reporting_login.password_set.
Raises DLWA4 (not a reporting login of this database), DLWA7 (role not created by DLW).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.drop_reporting_login(login text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_login text := drop_reporting_login.login;
    v_map   dlw.reporting_logins%ROWTYPE;
BEGIN
    DELETE FROM dlw.reporting_logins r WHERE r.login = v_login RETURNING * INTO v_map;
    IF v_map.login IS NULL THEN
        RAISE EXCEPTION '% is not a reporting login of this database', coalesce(quote_ident(v_login), 'NULL')
            USING ERRCODE = 'DLWA4';
    END IF;
    IF v_map.managed_role THEN
        PERFORM dlw.drop_login_role(v_login);
    ELSE
        RAISE NOTICE 'role % was not created by DLW: only its mapping was removed', quote_ident(v_login);
    END IF;
    PERFORM dlw.admin_audit(v_map.tenant_id, 'reporting_login.dropped', v_login,
        jsonb_build_object('via', 'dlw_admin.drop_reporting_login', 'role_dropped', v_map.managed_role));
END
$$;
COMMENT ON FUNCTION dlw_admin.drop_reporting_login(text) IS
$c$Removes a reporting login: deletes its tenant mapping (from then on it sees no rows) and drops the database role when dlw_admin.create_reporting_login created it (a role made elsewhere is kept, with a NOTICE). Open sessions of a dropped role see nothing more; end them with pg_terminate_backend as a superuser. Audited as reporting_login.dropped.
Raises DLWA4 (not a reporting login of this database), DLWA7 (the role gained other memberships or attributes: not dropped).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.list_reporting_logins(tenant_slug text DEFAULT NULL)
RETURNS TABLE (login name, tenant_id bigint, slug text, managed_role boolean, role_exists boolean,
               can_login boolean, created_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    IF list_reporting_logins.tenant_slug IS NOT NULL THEN
        v_id := dlw.admin_tenant_id(list_reporting_logins.tenant_slug);
    END IF;
    PERFORM dlw.admin_audit(coalesce(v_id, (SELECT f.platform_tenant_id FROM dlw.domain_facts() f)), 'admin.reporting_logins_listed', NULL,
        jsonb_build_object('via', 'dlw_admin.list_reporting_logins', 'tenant_id', v_id));
    RETURN QUERY
    SELECT r.login, r.tenant_id, t.slug, r.managed_role, ro.rolname IS NOT NULL, coalesce(ro.rolcanlogin, false),
           r.created_at
      FROM dlw.reporting_logins r
      JOIN dlw.tenants t ON t.tenant_id = r.tenant_id
      LEFT JOIN pg_roles ro ON ro.rolname = r.login
     WHERE v_id IS NULL OR r.tenant_id = v_id
     ORDER BY t.slug, r.login;
END
$$;
COMMENT ON FUNCTION dlw_admin.list_reporting_logins(text) IS
    'Reporting logins of one tenant (or of all when tenant_slug is NULL): the mapping, whether DLW created the role, whether the role still exists and can log in. Audited as admin.reporting_logins_listed. Raises DLWA1 (no such tenant).';

-- owner: dlw_system
-- dlw_admin: reporting logins (create, password, limits, drop, list). See sql/91_dlw_admin_helpers.sql
-- for the conventions and error codes.

-- ---------------------------------------------------------------------------------------
-- Reporting logins
-- ---------------------------------------------------------------------------------------

-- The mapping of a login that dlw_admin.create_reporting_login made, locked (invoker rights,
-- owned by dlw_system like its callers, EXECUTE for nobody else).
CREATE OR REPLACE FUNCTION dlw.lock_managed_reporting_login(p_login text) RETURNS dlw.reporting_logins
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_map dlw.reporting_logins%ROWTYPE;
BEGIN
    SELECT * INTO v_map FROM dlw.reporting_logins r WHERE r.login = p_login FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a reporting login of this database', coalesce(quote_ident(p_login), 'NULL')
            USING ERRCODE = 'DLWA4';
    END IF;
    IF NOT v_map.managed_role THEN
        RAISE EXCEPTION 'role % was not created by dlw_admin.create_reporting_login; a superuser manages it',
            quote_ident(p_login) USING ERRCODE = 'DLWA7';
    END IF;
    RETURN v_map;
END
$$;
COMMENT ON FUNCTION dlw.lock_managed_reporting_login(text) IS
    'Internal to dlw_admin (dlw_system): the dlw.reporting_logins row of a login, locked FOR UPDATE. Raises DLWA4 (not a reporting login of this database), DLWA7 (role not created by dlw_admin.create_reporting_login). Used by dlw_admin.set_reporting_login_password and dlw_admin.set_reporting_login_limits.';
REVOKE ALL ON FUNCTION dlw.lock_managed_reporting_login(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dlw_admin.create_reporting_login(login text, tenant_slug text, password text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_login text := create_reporting_login.login;
    v_id    bigint := dlw.admin_tenant_id(create_reporting_login.tenant_slug);
    v_map   dlw.reporting_logins%ROWTYPE;
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
    INSERT INTO dlw.reporting_logins AS r (tenant_id, login, managed_role) VALUES (v_id, v_login, true)
    RETURNING r.* INTO v_map;
    -- The platform defaults (the column defaults): connection limit and role defaults.
    PERFORM dlw.set_login_role_limits(v_login, v_map.connection_limit, v_map.statement_timeout_ms,
                                      v_map.idle_in_transaction_timeout_ms, v_map.temp_file_limit_kb);
    PERFORM dlw.admin_audit(v_id, 'reporting_login.created', v_login,
        jsonb_build_object('via', 'dlw_admin.create_reporting_login',
                           'authentication', CASE WHEN create_reporting_login.password IS NULL
                                                  THEN 'certificate or peer (no password)' ELSE 'password' END));
END
$$;
COMMENT ON FUNCTION dlw_admin.create_reporting_login(text, text, text) IS
$c$Creates a database login for BI tools and analysts that sees only this tenant's rows: CREATE ROLE <login> LOGIN IN ROLE dlw_reporting, mapped to the tenant in dlw.reporting_logins, with the default limits (CONNECTION LIMIT 5; statement_timeout and idle_in_transaction_session_timeout 5 min, temp_file_limit 1 GB, transactions 15 min at most; change them with dlw_admin.set_reporting_login_limits). password NULL = no password: the login then authenticates by client certificate (CN = login) or peer/ident, per pg_hba.conf. A password may also be given as a SCRAM-SHA-256 verifier. Audited as reporting_login.created (never the password).
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
    v_map := dlw.lock_managed_reporting_login(v_login);
    PERFORM dlw.set_login_role_password(v_login, set_reporting_login_password.password);
    PERFORM dlw.admin_audit(v_map.tenant_id, 'reporting_login.password_set', v_login,
        jsonb_build_object('via', 'dlw_admin.set_reporting_login_password',
                           'password_removed', set_reporting_login_password.password IS NULL));
END
$$;
COMMENT ON FUNCTION dlw_admin.set_reporting_login_password(text, text) IS
$c$Sets (rotates) the password of a reporting login created by dlw_admin.create_reporting_login; NULL removes it (certificate/peer authentication only). Open sessions stay connected. Audited as reporting_login.password_set.
Raises DLWA4 (not a reporting login of this database), DLWA7 (role not created by DLW).$c$;

-- The signature before migration 0014 had no transaction_timeout: gone, so one function sets
-- every limit.
DROP FUNCTION IF EXISTS dlw_admin.set_reporting_login_limits(text, integer, interval, interval, bigint);

CREATE OR REPLACE FUNCTION dlw_admin.set_reporting_login_limits(
    login text,
    connection_limit integer DEFAULT NULL,
    statement_timeout interval DEFAULT NULL,
    idle_in_transaction_timeout interval DEFAULT NULL,
    temp_file_limit_bytes bigint DEFAULT NULL,
    transaction_timeout interval DEFAULT NULL
)
RETURNS TABLE (connections_limit integer, statement_timeout_limit interval, idle_in_transaction_limit interval,
               temp_file_bytes_limit bigint, transaction_limit interval)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_login  text := set_reporting_login_limits.login;
    v_before dlw.reporting_logins%ROWTYPE;
    v_after  dlw.reporting_logins%ROWTYPE;
    v_stmt   numeric := extract(epoch FROM set_reporting_login_limits.statement_timeout) * 1000;
    v_idle   numeric := extract(epoch FROM set_reporting_login_limits.idle_in_transaction_timeout) * 1000;
    v_temp   numeric := ceil(set_reporting_login_limits.temp_file_limit_bytes / 1024.0);
    v_xact   numeric := extract(epoch FROM set_reporting_login_limits.transaction_timeout) * 1000;
BEGIN
    v_before := dlw.lock_managed_reporting_login(v_login);
    IF set_reporting_login_limits.connection_limit NOT BETWEEN 1 AND 100
       OR v_stmt NOT BETWEEN 1000 AND 86400000 OR v_idle NOT BETWEEN 1000 AND 86400000
       OR v_xact NOT BETWEEN 1000 AND 86400000 OR v_temp NOT BETWEEN 1024 AND 2147483647 THEN
        RAISE EXCEPTION 'reporting login limits out of range' USING ERRCODE = '22023',
            HINT = 'connection_limit 1 to 100; timeouts 1 s to 1 day; temp_file_limit_bytes 1 MB to 2 TB';
    END IF;
    UPDATE dlw.reporting_logins r
       SET connection_limit = coalesce(set_reporting_login_limits.connection_limit, r.connection_limit),
           statement_timeout_ms = coalesce(v_stmt::integer, r.statement_timeout_ms),
           idle_in_transaction_timeout_ms = coalesce(v_idle::integer, r.idle_in_transaction_timeout_ms),
           temp_file_limit_kb = coalesce(v_temp::integer, r.temp_file_limit_kb),
           transaction_timeout_ms = coalesce(v_xact::integer, r.transaction_timeout_ms)
     WHERE r.login = v_login
    RETURNING r.* INTO v_after;
    -- transaction_timeout_ms has no role setting on PostgreSQL 15/16: the watchdog alone holds it.
    PERFORM dlw.set_login_role_limits(v_login, v_after.connection_limit, v_after.statement_timeout_ms,
                                      v_after.idle_in_transaction_timeout_ms, v_after.temp_file_limit_kb);
    PERFORM dlw.admin_audit(v_after.tenant_id, 'reporting_login.limits_set', v_login,
        jsonb_build_object('via', 'dlw_admin.set_reporting_login_limits',
            'before', jsonb_build_object('connection_limit', v_before.connection_limit,
                                         'statement_timeout_ms', v_before.statement_timeout_ms,
                                         'idle_in_transaction_timeout_ms', v_before.idle_in_transaction_timeout_ms,
                                         'temp_file_limit_kb', v_before.temp_file_limit_kb,
                                         'transaction_timeout_ms', v_before.transaction_timeout_ms),
            'after', jsonb_build_object('connection_limit', v_after.connection_limit,
                                        'statement_timeout_ms', v_after.statement_timeout_ms,
                                        'idle_in_transaction_timeout_ms', v_after.idle_in_transaction_timeout_ms,
                                        'temp_file_limit_kb', v_after.temp_file_limit_kb,
                                        'transaction_timeout_ms', v_after.transaction_timeout_ms)));
    RETURN QUERY SELECT v_after.connection_limit, v_after.statement_timeout_ms * interval '1 millisecond',
                        v_after.idle_in_transaction_timeout_ms * interval '1 millisecond',
                        v_after.temp_file_limit_kb::bigint * 1024,
                        v_after.transaction_timeout_ms * interval '1 millisecond';
END
$$;
COMMENT ON FUNCTION dlw_admin.set_reporting_login_limits(text, integer, interval, interval, bigint, interval) IS
$c$Changes the limits of a reporting login created by dlw_admin.create_reporting_login; arguments left out (NULL) are kept. Returns the limits now in force (connections_limit, statement_timeout_limit, idle_in_transaction_limit, temp_file_bytes_limit, transaction_limit). connection_limit (1 to 100): CONNECTION LIMIT, for new connections. statement_timeout, idle_in_transaction_timeout (1 s to 1 day): role defaults for new sessions; the login may lower or disable them with SET, and the watchdog run with every usage fold (about once a minute) cancels its statements, and terminates its sessions idle in a transaction, that run longer anyway. temp_file_limit_bytes (1 MB to 2 TB, rounded up to kB): role default the login cannot raise (a superuser-only setting). transaction_timeout (1 s to 1 day, default 15 min): the longest transaction; the watchdog terminates a session whose transaction is older, however busy it keeps it (no role setting exists for it on PostgreSQL 15/16); applies to open sessions at once. Other settings reach open sessions when they reconnect. Audited as reporting_login.limits_set with the limits before and after.
Raises DLWA4 (not a reporting login of this database), DLWA7 (role not created by DLW), 22023 (out of range).$c$;

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

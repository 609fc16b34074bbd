-- owner: dlw_login_manager
-- Login roles are created, limited, altered and dropped by four small definer functions owned by
-- dlw_login_manager (CREATEROLE, nothing else; see migrations/0006.reporting_admin.sql), which
-- only dlw_system may call (from the dlw_admin functions, sql/93_dlw_admin_logins.sql).

-- ---------------------------------------------------------------------------------------
-- Login roles (owner: dlw_login_manager; callable by dlw_system only)
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.create_login_role(p_login text, p_password text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_login IS NULL OR p_login !~ (SELECT f.login_name_pattern FROM dlw.domain_facts() f)
       OR p_login ~ (SELECT f.login_name_reserved_pattern FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'invalid login name %', quote_literal(p_login) USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_login) THEN
        RAISE EXCEPTION 'a role named % already exists', quote_ident(p_login) USING ERRCODE = 'DLWA3';
    END IF;
    -- The error context of a failing EXECUTE would quote the statement, password included:
    -- re-raise with the message only.
    BEGIN
        EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT'
                       ' PASSWORD %s IN ROLE dlw_reporting',
                       p_login, coalesce(quote_literal(p_password), 'NULL'));
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
            RAISE EXCEPTION 'a role named % already exists', quote_ident(p_login) USING ERRCODE = 'DLWA3';
        WHEN OTHERS THEN
            RAISE EXCEPTION 'could not create role %: %', quote_ident(p_login), SQLERRM USING ERRCODE = SQLSTATE;
    END;
END
$$;
COMMENT ON FUNCTION dlw.create_login_role(text, text) IS
    'Internal (dlw_system only): CREATE ROLE <login> LOGIN ... IN ROLE dlw_reporting, with a password or none (certificate/peer authentication). Raises 22023 bad name, DLWA3 name taken.';

CREATE OR REPLACE FUNCTION dlw.is_plain_reporting_login(p_login text) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- No attributes, a member of dlw_reporting and of nothing else, and nobody a member of it
    -- but dlw_login_manager (which PostgreSQL 16 makes its admin on creation).
    SELECT NOT EXISTS (SELECT 1 FROM pg_roles r
                        WHERE r.rolname = p_login
                          AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls))
       AND NOT EXISTS (SELECT 1 FROM pg_auth_members m
                        WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = p_login)
                          AND m.roleid <> 'dlw_reporting'::regrole)
       AND NOT EXISTS (SELECT 1 FROM pg_auth_members m
                        WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = p_login)
                          AND m.member <> 'dlw_login_manager'::regrole)
$$;
COMMENT ON FUNCTION dlw.is_plain_reporting_login(text) IS
    'Internal (dlw_login_manager): true when a role is a plain reporting login that DLW may re-password or drop (on PostgreSQL 15 CREATEROLE alone would reach any non-superuser role).';
REVOKE ALL ON FUNCTION dlw.is_plain_reporting_login(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dlw.check_plain_reporting_login(p_login text, p_what text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_login) THEN
        RAISE EXCEPTION 'role % does not exist', quote_ident(p_login) USING ERRCODE = 'DLWA4';
    END IF;
    -- The same guard as dlw.drop_login_role: on PostgreSQL 15 CREATEROLE could change any
    -- non-superuser role's password or settings, so refuse anything but a plain reporting login.
    IF NOT dlw.is_plain_reporting_login(p_login) THEN
        RAISE EXCEPTION 'role % is not a plain reporting login; % not changed', quote_ident(p_login), p_what
            USING ERRCODE = 'DLWA7';
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.check_plain_reporting_login(text, text) IS
    'Internal (dlw_login_manager): the guard of dlw.set_login_role_password and dlw.set_login_role_limits before they alter a role. Raises DLWA4 when the role does not exist, DLWA7 when it is not a plain reporting login (the message says p_what was not changed).';
REVOKE ALL ON FUNCTION dlw.check_plain_reporting_login(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dlw.set_login_role_password(p_login text, p_password text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM dlw.check_plain_reporting_login(p_login, 'password');
    BEGIN
        EXECUTE format('ALTER ROLE %I PASSWORD %s', p_login, coalesce(quote_literal(p_password), 'NULL'));
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'could not change the password of role %: %', quote_ident(p_login), SQLERRM
            USING ERRCODE = SQLSTATE;
    END;
END
$$;
COMMENT ON FUNCTION dlw.set_login_role_password(text, text) IS
    'Internal (dlw_system only): ALTER ROLE <login> PASSWORD ... (NULL removes the password).';

CREATE OR REPLACE FUNCTION dlw.drop_login_role(p_login text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_login) THEN
        RETURN;
    END IF;
    IF NOT dlw.is_plain_reporting_login(p_login) THEN
        RAISE EXCEPTION 'role % is not a plain reporting login; not dropped', quote_ident(p_login)
            USING ERRCODE = 'DLWA7';
    END IF;
    EXECUTE format('DROP ROLE %I', p_login);
END
$$;
COMMENT ON FUNCTION dlw.drop_login_role(text) IS
    'Internal (dlw_system only): DROP ROLE <login> if it exists and is a plain member of dlw_reporting (else DLWA7).';

CREATE OR REPLACE FUNCTION dlw.set_login_role_limits(p_login text, p_connection_limit integer,
    p_statement_timeout_ms integer, p_idle_in_transaction_timeout_ms integer, p_temp_file_limit_kb integer)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM dlw.check_plain_reporting_login(p_login, 'limits');
    -- Plain numbers (ms, kB): stored as given, compared as text by dlw doctor. The values come
    -- from the CHECKed columns of dlw.reporting_logins; %s of an integer cannot inject.
    EXECUTE format('ALTER ROLE %I CONNECTION LIMIT %s', p_login, p_connection_limit::integer);
    EXECUTE format('ALTER ROLE %I SET statement_timeout = %s', p_login, p_statement_timeout_ms::integer);
    EXECUTE format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %s', p_login,
                   p_idle_in_transaction_timeout_ms::integer);
    -- temp_file_limit is superuser-only (PGC_SUSET): migrations/0013 grants SET ON PARAMETER.
    EXECUTE format('ALTER ROLE %I SET temp_file_limit = %s', p_login, p_temp_file_limit_kb::integer);
END
$$;
COMMENT ON FUNCTION dlw.set_login_role_limits(text, integer, integer, integer, integer) IS
    'Internal (dlw_system only): ALTER ROLE <login> CONNECTION LIMIT n and SET statement_timeout, idle_in_transaction_session_timeout (ms), temp_file_limit (kB), for a plain reporting login (else DLWA7; DLWA4 no such role).';

REVOKE ALL ON FUNCTION dlw.create_login_role(text, text), dlw.set_login_role_password(text, text),
    dlw.drop_login_role(text), dlw.set_login_role_limits(text, integer, integer, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.create_login_role(text, text), dlw.set_login_role_password(text, text),
    dlw.drop_login_role(text), dlw.set_login_role_limits(text, integer, integer, integer, integer) TO dlw_system;

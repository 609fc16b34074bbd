-- DBA administration from psql, without a superuser: the dlw_admin schema.
--
-- Every dlw_admin.* function is SECURITY DEFINER, owned by dlw_system (BYPASSRLS, so it can
-- act on any tenant), pins search_path, is EXECUTE-able only by members of the dlw_admin role,
-- is listed in app/doctor.py's DEFINER_ALLOWLIST, and appends an audit row with
-- actor = session_user (the DBA's own login, even after SET ROLE). Each call is one statement,
-- so it commits or rolls back as a whole: a refusal leaves nothing behind.
--
-- Login roles are created, altered and dropped by three small definer functions owned by
-- dlw_login_manager (CREATEROLE, nothing else; see migrations/0006.reporting_admin.sql), which
-- only dlw_system may call.
--
-- Errors (SQLSTATE, documented in docs/dba.md):
--   DLWA1  tenant not found               DLWA5  user not found in that tenant
--   DLWA2  tenant slug already taken      DLWA6  the platform tenant (id 1) cannot be deactivated
--   DLWA3  a role with that name exists   DLWA7  role not created by DLW: left alone
--   DLWA4  not a reporting login of this database
--   22023  invalid argument (slug, login name, role, negative limit, not a reporting view)

-- ---------------------------------------------------------------------------------------
-- Login roles (owner: dlw_login_manager; callable by dlw_system only)
-- ---------------------------------------------------------------------------------------
SET ROLE dlw_login_manager;

CREATE OR REPLACE FUNCTION dlw.create_login_role(p_login text, p_password text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_login IS NULL OR p_login !~ '^[a-z_][a-z0-9_.@-]{0,62}$' OR p_login ~ '^(pg_|dlw_)' THEN
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

CREATE OR REPLACE FUNCTION dlw.set_login_role_password(p_login text, p_password text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_login) THEN
        RAISE EXCEPTION 'role % does not exist', quote_ident(p_login) USING ERRCODE = 'DLWA4';
    END IF;
    -- The same guard as dlw.drop_login_role: on PostgreSQL 15 CREATEROLE could change any
    -- non-superuser role's password, so refuse anything but a plain reporting login.
    IF NOT dlw.is_plain_reporting_login(p_login) THEN
        RAISE EXCEPTION 'role % is not a plain reporting login; password not changed', quote_ident(p_login)
            USING ERRCODE = 'DLWA7';
    END IF;
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

REVOKE ALL ON FUNCTION dlw.create_login_role(text, text), dlw.set_login_role_password(text, text),
    dlw.drop_login_role(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.create_login_role(text, text), dlw.set_login_role_password(text, text),
    dlw.drop_login_role(text) TO dlw_system;

-- ---------------------------------------------------------------------------------------
-- Helpers (invoker rights, owned by dlw_system, called only from the functions below)
-- ---------------------------------------------------------------------------------------
SET ROLE dlw_system;

CREATE OR REPLACE FUNCTION dlw.admin_tenant_id(p_ref text) RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT t.tenant_id INTO v_id FROM dlw.tenants t
     WHERE CASE WHEN p_ref ~ '^[0-9]{1,18}$' THEN t.tenant_id = p_ref::bigint ELSE t.slug = p_ref END;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'tenant % not found', coalesce(quote_literal(p_ref), 'NULL') USING ERRCODE = 'DLWA1',
            HINT = 'SELECT slug FROM dlw_admin.list_tenants() lists the tenants';
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION dlw.admin_tenant_id(text) IS
    'Internal to dlw_admin: the id of the tenant named by slug (or numeric id); raises DLWA1 when there is none. Needs BYPASSRLS (dlw_system).';

CREATE OR REPLACE FUNCTION dlw.admin_audit(p_tenant_id bigint, p_action text, p_target text, p_detail jsonb)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
    VALUES (p_tenant_id, session_user, p_action, p_target, coalesce(p_detail, '{}'::jsonb));
$$;
COMMENT ON FUNCTION dlw.admin_audit(bigint, text, text, jsonb) IS
    'Internal to dlw_admin: appends an audit row to a tenant''s trail with actor = session_user (the DBA''s login).';

CREATE OR REPLACE FUNCTION dlw.admin_check_slug(p_slug text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_slug IS NULL OR p_slug !~ '^[a-z][a-z0-9-]{1,62}$' THEN
        RAISE EXCEPTION 'invalid tenant slug %', coalesce(quote_literal(p_slug), 'NULL') USING ERRCODE = '22023',
            HINT = 'a slug is 2 to 63 characters: a lowercase letter, then lowercase letters, digits or hyphens';
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.admin_check_slug(text) IS 'Internal to dlw_admin: raises 22023 unless p_slug is a valid tenant slug.';

CREATE OR REPLACE FUNCTION dlw.admin_check_limits(p_concurrent integer, p_bytes_month bigint, p_storage_gb integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_concurrent < 0 OR p_bytes_month < 0 OR p_storage_gb < 0 THEN
        RAISE EXCEPTION 'quota limits must be >= 0 (0 = unlimited)' USING ERRCODE = '22023';
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.admin_check_limits(integer, bigint, integer) IS
    'Internal to dlw_admin: raises 22023 when a quota limit is negative (NULL = not given).';

CREATE OR REPLACE FUNCTION dlw.admin_user_id(p_tenant_id bigint, p_user_ref text) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids uuid[];
BEGIN
    IF p_user_ref ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT array_agg(u.id) INTO v_ids FROM dlw.users u
         WHERE u.tenant_id = p_tenant_id AND u.id = p_user_ref::uuid;
    ELSE
        SELECT array_agg(u.id) INTO v_ids FROM dlw.users u
         WHERE u.tenant_id = p_tenant_id AND lower(u.email) = lower(p_user_ref);
    END IF;
    IF v_ids IS NULL THEN
        RAISE EXCEPTION 'no user % in tenant %', coalesce(quote_literal(p_user_ref), 'NULL'), p_tenant_id
            USING ERRCODE = 'DLWA5', HINT = 'dlw_admin.list_users(tenant) lists the tenant''s users';
    END IF;
    IF cardinality(v_ids) > 1 THEN
        RAISE EXCEPTION 'email % matches % users of tenant %; name the user by id', quote_literal(p_user_ref),
            cardinality(v_ids), p_tenant_id USING ERRCODE = '22023';
    END IF;
    RETURN v_ids[1];
END
$$;
COMMENT ON FUNCTION dlw.admin_user_id(bigint, text) IS
    'Internal to dlw_admin: a user of the tenant by id or (case-insensitive, unambiguous) email; raises DLWA5 when there is none.';

REVOKE ALL ON FUNCTION dlw.admin_tenant_id(text), dlw.admin_audit(bigint, text, text, jsonb),
    dlw.admin_check_slug(text), dlw.admin_check_limits(integer, bigint, integer),
    dlw.admin_user_id(bigint, text) FROM PUBLIC;

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
    PERFORM dlw.admin_check_slug(v_slug);
    IF v_name IS NULL OR length(v_name) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'display name must be 1 to 200 characters' USING ERRCODE = '22023';
    END IF;
    PERFORM dlw.admin_check_limits(create_tenant.quota_concurrent, create_tenant.quota_bytes_month,
                                   create_tenant.quota_storage_gb);
    -- Claim the slug first: a concurrent creation of the same slug waits here, then gets DLWA2.
    INSERT INTO dlw.tenants AS t (slug, display_name, quota_concurrent, quota_bytes_month, quota_storage_gb)
    VALUES (v_slug, v_name,
            coalesce(create_tenant.quota_concurrent, 10),
            coalesce(create_tenant.quota_bytes_month, 1099511627776),
            coalesce(create_tenant.quota_storage_gb, 1024))
    ON CONFLICT ON CONSTRAINT tenants_slug_key DO NOTHING
    RETURNING t.tenant_id INTO v_id;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'tenant % already exists', quote_literal(v_slug) USING ERRCODE = 'DLWA2';
    END IF;
    PERFORM dlw.provision_tenant(v_slug, v_name);  -- default project and storage target
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
    IF v_name IS NOT NULL AND length(v_name) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'display name must be 1 to 200 characters' USING ERRCODE = '22023';
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
    v_reason  text := deactivate_tenant.reason;
    v_period  date := dlw.month_start(now());
    v_was     boolean;
    v_tasks   bigint;
    v_files   bigint;
BEGIN
    IF v_id = 1 THEN
        RAISE EXCEPTION 'the platform tenant (id 1) cannot be deactivated' USING ERRCODE = 'DLWA6',
            DETAIL = 'the service token and system_admin principals act in tenant 1';
    END IF;
    -- Serialise with task admission: lock the rows dlw.create_task locks (insert-then-lock,
    -- previous then current month). An admission in flight finishes first and its task is
    -- cancelled below; one that starts later sees the tenant inactive.
    INSERT INTO dlw.quota_snapshots (tenant_id, period, metric, amount)
    VALUES (v_id, (v_period - interval '1 month')::date, 'bytes_month', 0), (v_id, v_period, 'bytes_month', 0)
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM dlw.quota_snapshots q
     WHERE q.tenant_id = v_id AND q.metric = 'bytes_month' AND q.period IN ((v_period - interval '1 month')::date, v_period)
     ORDER BY q.period
       FOR UPDATE;
    SELECT t.active INTO v_was FROM dlw.tenants t WHERE t.tenant_id = v_id FOR UPDATE;
    UPDATE dlw.tenants t SET active = false, updated_at = now() WHERE t.tenant_id = v_id;

    -- Files first, then tasks (the order in which executors update them). Clearing the
    -- assignment token and lease invalidates every executor lease.
    UPDATE dlw.task_files f
       SET status = 'cancelled', assignment_token = NULL, lease_expires_at = NULL,
           error = coalesce(f.error, 'tenant deactivated')
     WHERE f.tenant_id = v_id AND f.status IN ('pending', 'assigned', 'running');
    GET DIAGNOSTICS v_files = ROW_COUNT;
    WITH live AS (
        SELECT x.id, x.status FROM dlw.tasks x
         WHERE x.tenant_id = v_id AND x.status IN ('pending', 'running')
           FOR UPDATE
    ), cancelled AS (
        UPDATE dlw.tasks x
           SET status = 'cancelled', error = coalesce(x.error, 'tenant deactivated')
          FROM live
         WHERE x.tenant_id = v_id AND x.id = live.id
        RETURNING x.id, live.status AS previous_status
    ), audited AS (
        INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)
        SELECT v_id, session_user, 'task.cancelled', c.id::text,
               jsonb_build_object('previous_status', c.previous_status, 'reason', 'tenant deactivated',
                                  'via', 'dlw_admin.deactivate_tenant')
          FROM cancelled c
    )
    SELECT count(*) INTO v_tasks FROM cancelled;

    PERFORM dlw.admin_audit(v_id, 'tenant.deactivated', v_id::text,
        jsonb_build_object('via', 'dlw_admin.deactivate_tenant', 'reason', v_reason, 'was_active', v_was,
                           'tasks_cancelled', v_tasks, 'files_cancelled', v_files));
    RETURN QUERY SELECT v_tasks, v_files;
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
    PERFORM dlw.admin_audit(1, 'admin.tenants_listed', NULL, jsonb_build_object('via', 'dlw_admin.list_tenants'));
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
    IF v_login IS NULL OR v_login !~ '^[a-z_][a-z0-9_.@-]{0,62}$' OR v_login ~ '^(pg_|dlw_)' THEN
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
    PERFORM dlw.admin_audit(coalesce(v_id, 1), 'admin.reporting_logins_listed', NULL,
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

-- ---------------------------------------------------------------------------------------
-- Users and role grants (casbin g rows in dlw.casbin_rule; every API instance reloads on NOTIFY)
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw_admin.list_users(tenant_slug text)
RETURNS TABLE (user_id uuid, email text, role text, granted_roles text[], issuer text, created_at timestamptz,
               last_login_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint := dlw.admin_tenant_id(list_users.tenant_slug);
BEGIN
    PERFORM dlw.admin_audit(v_id, 'admin.users_listed', NULL, jsonb_build_object('via', 'dlw_admin.list_users'));
    RETURN QUERY
    SELECT u.id, u.email, u.role,
           coalesce((SELECT array_agg(c.v1 ORDER BY c.v1) FROM dlw.casbin_rule c
                      WHERE c.ptype = 'g' AND c.v0 = 'user:' || u.id::text), '{}'::text[]),
           u.issuer, u.created_at, u.last_login_at
      FROM dlw.users u
     WHERE u.tenant_id = v_id
     ORDER BY u.created_at, u.id;
END
$$;
COMMENT ON FUNCTION dlw_admin.list_users(text) IS
    'The users of a tenant: id, email, the role they were given at first login (role) and the extra roles granted with dlw_admin.grant_role (granted_roles). Audited as admin.users_listed. Raises DLWA1 (no such tenant).';

CREATE OR REPLACE FUNCTION dlw_admin.grant_role(tenant_slug text, user_ref text, role text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id    bigint := dlw.admin_tenant_id(grant_role.tenant_slug);
    v_role  text := grant_role.role;
    v_user  uuid;
    v_new   boolean;
BEGIN
    IF v_role IS NULL OR v_role NOT IN ('tenant_admin', 'tenant_operator', 'tenant_viewer') THEN
        RAISE EXCEPTION 'role % cannot be granted', coalesce(quote_literal(v_role), 'NULL') USING ERRCODE = '22023',
            HINT = 'grantable roles: tenant_admin, tenant_operator, tenant_viewer (they apply in the user''s own tenant)';
    END IF;
    v_user := dlw.admin_user_id(v_id, grant_role.user_ref);
    INSERT INTO dlw.casbin_rule (ptype, v0, v1) VALUES ('g', 'user:' || v_user::text, v_role)
    ON CONFLICT DO NOTHING;
    v_new := FOUND;
    PERFORM dlw.admin_audit(v_id, 'role.granted', v_user::text,
        jsonb_build_object('via', 'dlw_admin.grant_role', 'role', v_role, 'already_granted', NOT v_new));
    RETURN v_new;
END
$$;
COMMENT ON FUNCTION dlw_admin.grant_role(text, text, text) IS
$c$Grants a user (by id or email, within the tenant) a tenant role on top of the role they already have: a casbin g row "user:<id>, <role>"; running API instances pick it up within a second. Returns true when granted, false when it already was. Audited as role.granted.
Raises DLWA1 (no such tenant), DLWA5 (no such user in the tenant), 22023 (role not grantable, or an email shared by several users).$c$;

CREATE OR REPLACE FUNCTION dlw_admin.revoke_role(tenant_slug text, user_ref text, role text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id      bigint := dlw.admin_tenant_id(revoke_role.tenant_slug);
    v_role    text := revoke_role.role;
    v_user    uuid := dlw.admin_user_id(v_id, revoke_role.user_ref);
    v_removed boolean;
BEGIN
    DELETE FROM dlw.casbin_rule c WHERE c.ptype = 'g' AND c.v0 = 'user:' || v_user::text AND c.v1 = v_role;
    v_removed := FOUND;
    PERFORM dlw.admin_audit(v_id, 'role.revoked', v_user::text,
        jsonb_build_object('via', 'dlw_admin.revoke_role', 'role', v_role, 'was_granted', v_removed));
    IF NOT v_removed AND EXISTS (SELECT 1 FROM dlw.users u WHERE u.tenant_id = v_id AND u.id = v_user AND u.role = v_role) THEN
        RAISE NOTICE '% is the user''s own role, not a grant; a tenant admin changes it (PATCH /api/v1/users/{id})', v_role;
    END IF;
    RETURN v_removed;
END
$$;
COMMENT ON FUNCTION dlw_admin.revoke_role(text, text, text) IS
$c$Revokes a role granted with dlw_admin.grant_role (deletes the casbin g row). Returns true when a grant was removed, false when there was none (the user's own role, dlw.users.role, is not a grant: a NOTICE says so). Audited as role.revoked.
Raises DLWA1 (no such tenant), DLWA5 (no such user in the tenant).$c$;

-- ---------------------------------------------------------------------------------------
-- Support: see what a tenant sees
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION dlw_admin.view_as_tenant(tenant_slug text, reporting_view anyelement)
RETURNS SETOF anyelement
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id  bigint := dlw.admin_tenant_id(view_as_tenant.tenant_slug);
    v_rel regclass;
BEGIN
    SELECT c.oid::regclass INTO v_rel
      FROM pg_type ty JOIN pg_class c ON c.oid = ty.typrelid
     WHERE ty.oid = pg_typeof(view_as_tenant.reporting_view)
       AND c.relnamespace = 'reporting'::regnamespace AND c.relkind = 'v';
    IF v_rel IS NULL THEN
        RAISE EXCEPTION '% is not a reporting view', pg_typeof(view_as_tenant.reporting_view) USING ERRCODE = '22023',
            HINT = 'pass a typed NULL of a view, e.g. NULL::reporting.tasks';
    END IF;
    PERFORM dlw.admin_audit(v_id, 'support.viewed_as_tenant', v_rel::text,
        jsonb_build_object('via', 'dlw_admin.view_as_tenant'));
    -- Exactly the rows the tenant's reporting logins see (their policy is tenant_id = theirs).
    RETURN QUERY EXECUTE format('SELECT v.* FROM %s AS v WHERE v.tenant_id = $1', v_rel) USING v_id;
END
$$;
COMMENT ON FUNCTION dlw_admin.view_as_tenant(text, anyelement) IS
$c$Support access, read-only: the rows a tenant's reporting logins see in one reporting view, e.g. SELECT * FROM dlw_admin.view_as_tenant('acme', NULL::reporting.quota_status). Filter, sort and limit outside the call. Audited in that tenant's own trail as support.viewed_as_tenant (the tenant can see that support looked).
Raises DLWA1 (no such tenant), 22023 (not a reporting view).$c$;

-- ---------------------------------------------------------------------------------------
-- Usage snapshots: a forced refresh and the drift check, audited in the platform tenant's trail.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw_admin.refresh_quota_snapshots()
RETURNS TABLE (ran boolean, events bigint, tenants integer, periods integer, folded_from xid8, folded_below xid8)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM dlw.refresh_quota_snapshots();
    PERFORM dlw.admin_audit(1, 'snapshots.refreshed', NULL, jsonb_build_object('via', 'dlw_admin.refresh_quota_snapshots'));
END
$$;
COMMENT ON FUNCTION dlw_admin.refresh_quota_snapshots() IS
    'Folds new usage into quota_snapshots now (what the per-minute job does; skipped, ran = false, if a run is in progress). Audited as snapshots.refreshed in tenant 1''s trail.';

CREATE OR REPLACE FUNCTION dlw_admin.quota_drift()
RETURNS TABLE (tenant_id bigint, period date, metric text, snapshot_amount bigint, log_amount bigint, difference bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM dlw.quota_drift();
    PERFORM dlw.admin_audit(1, 'snapshots.drift_checked', NULL, jsonb_build_object('via', 'dlw_admin.quota_drift'));
END
$$;
COMMENT ON FUNCTION dlw_admin.quota_drift() IS
    'Recomputes every tenant''s folded usage from the log and returns the (tenant, month) rows whose snapshot differs; no rows = no drift. Read-only apart from its audit row (snapshots.drift_checked, tenant 1).';

-- ---------------------------------------------------------------------------------------
-- Privileges: members of dlw_admin call every dlw_admin function; nobody else does.
-- ---------------------------------------------------------------------------------------
DO $grants$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = 'dlw_admin'::regnamespace
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO dlw_admin', fn);
    END LOOP;
END
$grants$;

SET ROLE dlw_owner;

-- owner: dlw_system
-- DBA administration from psql, without a superuser: the dlw_admin schema.
--
-- Every dlw_admin.* function is SECURITY DEFINER, owned by dlw_system (BYPASSRLS, so it can
-- act on any tenant), pins search_path, is EXECUTE-able only by members of the dlw_admin role,
-- is listed in app/ops/catalog_check.py's DEFINER_ALLOWLIST, and appends an audit row with
-- actor = session_user (the DBA's own login, even after SET ROLE). Each call is one statement,
-- so it commits or rolls back as a whole: a refusal leaves nothing behind.
--
-- Files: the helpers (here), tenants (92_dlw_admin_tenants.sql), reporting logins
-- (93_dlw_admin_logins.sql, over the login-role functions of 90_login_roles.sql), users, role
-- grants, support access, usage snapshots and the grants (94_dlw_admin_support.sql).
--
-- Errors (SQLSTATE, documented in docs/dba.md):
--   DLWA1  tenant not found               DLWA5  user not found in that tenant
--   DLWA2  tenant slug already taken      DLWA6  the platform tenant (id 1) cannot be deactivated
--   DLWA3  a role with that name exists   DLWA7  role not created by DLW: left alone
--   DLWA4  not a reporting login of this database
--   DLWA8  an email the identity provider did not verify: name the user by id
--   DLWA9  an email shared by several users of the tenant: name the user by id
--   22023  invalid argument (slug, login name, role, negative limit, not a reporting view)

-- ---------------------------------------------------------------------------------------
-- Helpers (invoker rights, owned by dlw_system, called only from the dlw_admin functions;
-- the two checks also from dlw.tenant_create, which runs as dlw_system or a superuser)
-- ---------------------------------------------------------------------------------------
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
    SELECT dlw.audit_append(p_tenant_id, session_user, p_action, p_target, p_detail);
$$;
COMMENT ON FUNCTION dlw.admin_audit(bigint, text, text, jsonb) IS
    'Internal to dlw_admin: appends an audit row to a tenant''s trail with actor = session_user (the DBA''s login).';

CREATE OR REPLACE FUNCTION dlw.admin_check_slug(p_slug text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_slug IS NULL OR p_slug !~ (SELECT f.tenant_slug_pattern FROM dlw.domain_facts() f) THEN
        RAISE EXCEPTION 'invalid tenant slug %', coalesce(quote_literal(p_slug), 'NULL') USING ERRCODE = '22023',
            HINT = 'a slug is 2 to 63 characters: a lowercase letter, then lowercase letters, digits or hyphens';
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.admin_check_slug(text) IS 'Internal (dlw_system): raises 22023 unless p_slug matches dlw.domain_facts().tenant_slug_pattern. Used by dlw.tenant_create (every tenant-creation path) and dlw_admin.rename_tenant.';

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
    'Internal (dlw_system): raises 22023 when a quota limit is negative (NULL = not given). Used by dlw.tenant_create and dlw_admin.set_quota.';

CREATE OR REPLACE FUNCTION dlw.admin_user_id(p_tenant_id bigint, p_user_ref text) RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids      uuid[];
    v_verified boolean;
BEGIN
    IF p_user_ref ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT array_agg(u.id) INTO v_ids FROM dlw.users u
         WHERE u.tenant_id = p_tenant_id AND u.id = p_user_ref::uuid;
        v_verified := true;
    ELSE
        -- Every address of the tenant that equals the reference, whatever its case and whether
        -- verified or not: an unverified twin makes the address ambiguous too.
        SELECT array_agg(u.id ORDER BY u.id), bool_and(u.email_verified) INTO v_ids, v_verified FROM dlw.users u
         WHERE u.tenant_id = p_tenant_id AND lower(u.email) = lower(btrim(p_user_ref));
    END IF;
    IF v_ids IS NULL THEN
        RAISE EXCEPTION 'no user % in tenant %', coalesce(quote_literal(p_user_ref), 'NULL'), p_tenant_id
            USING ERRCODE = 'DLWA5', HINT = 'dlw_admin.list_users(tenant) lists the tenant''s users';
    END IF;
    -- The two email refusals are one line each (no HINT, no user id to copy: who the address
    -- really belongs to is for the DBA to find out), as psql and `dlw user` print them.
    IF cardinality(v_ids) > 1 THEN
        RAISE EXCEPTION 'email % is shared by % users of tenant %: name the user by id', quote_literal(p_user_ref),
            cardinality(v_ids), p_tenant_id USING ERRCODE = 'DLWA9';
    END IF;
    IF NOT v_verified THEN
        RAISE EXCEPTION 'email % in tenant % was not verified by the identity provider: name the user by id',
            quote_literal(p_user_ref), p_tenant_id USING ERRCODE = 'DLWA8';
    END IF;
    RETURN v_ids[1];
END
$$;
COMMENT ON FUNCTION dlw.admin_user_id(bigint, text) IS
    'Internal to dlw_admin: a user of the tenant by id, or by email (case-insensitive) when exactly one user of the tenant has that address and the identity provider verified it. Raises DLWA5 (no such user), DLWA9 (an email shared by several users), DLWA8 (an unverified email).';

REVOKE ALL ON FUNCTION dlw.admin_tenant_id(text), dlw.admin_audit(bigint, text, text, jsonb),
    dlw.admin_check_slug(text), dlw.admin_check_limits(integer, bigint, integer),
    dlw.admin_user_id(bigint, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------
-- Repeats on the audit trail (for the API and the login function, not dlw_admin; here because
-- this file holds dlw_system's audit writers). A flood of permission denials, quota refusals or
-- failed logins must not grow the trail without bound: one row per (tenant, UTC minute, action,
-- actor, target, metric of detail) whose count grows. dlw.audit_repeat_in is the one writer of
-- repeat rows; its callers choose tenant and actor: dlw.audit_repeat (the API) from the context
-- only, dlw.login_user (sql/60_identity.sql) the tenant it resolved and the login's subject.
-- dlw_app may insert audit rows but never change one, so the increment is dlw_system's: it
-- only ever adds 1 to the count (and moves last_at) of a repeat row.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.audit_repeat_in(
    p_tenant_id bigint, p_actor text, p_action text, p_target text, p_detail jsonb DEFAULT '{}'::jsonb
) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_tenant_id IS NULL THEN
        RAISE EXCEPTION 'dlw.audit_repeat_in: a tenant is required' USING ERRCODE = '22004';
    END IF;
    IF p_action IS NULL THEN
        RAISE EXCEPTION 'dlw.audit_repeat_in: an action is required' USING ERRCODE = '22004';
    END IF;
    INSERT INTO dlw.audit_log AS a (tenant_id, id, at, actor, action, target, detail, count, minute, last_at)
    VALUES (p_tenant_id, dlw.new_id(), v_now, p_actor, p_action, p_target, coalesce(p_detail, '{}'::jsonb), 1,
            date_trunc('minute', v_now, 'UTC'), v_now)
    ON CONFLICT (tenant_id, minute, action, (coalesce(actor, '')), (coalesce(target, '')),
                 (coalesce(detail ->> 'metric', '')))
        WHERE minute IS NOT NULL
    DO UPDATE SET count = a.count + 1, last_at = greatest(a.last_at, excluded.last_at);
END
$$;
COMMENT ON FUNCTION dlw.audit_repeat_in(bigint, text, text, text, jsonb) IS
    'Internal (dlw_system''s definer functions only): records one occurrence of a repeatable event in a tenant''s audit trail: the first in a UTC minute inserts a repeat row (count 1, minute, at = last_at = now; detail is the first occurrence''s), each further one with the same (action, actor, target, detail->>metric) in that minute adds 1 to its count and moves last_at. The one writer of repeat rows; callers choose tenant and actor (dlw.audit_repeat from the context, dlw.login_user for failed logins).';

CREATE OR REPLACE FUNCTION dlw.audit_repeat(p_action text, p_target text, p_detail jsonb DEFAULT '{}'::jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant bigint := dlw.ctx_tenant_id();
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.audit_repeat: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    PERFORM dlw.audit_repeat_in(v_tenant, dlw.ctx_user_id(), p_action, p_target, p_detail);
END
$$;
COMMENT ON FUNCTION dlw.audit_repeat(text, text, jsonb) IS
    'Records one occurrence of a repeatable event (permission_denied, quota.exceeded) in the context tenant''s audit trail, as the context''s actor, through dlw.audit_repeat_in (one repeat row per action, actor, target, detail->>metric and UTC minute, whose count grows). SECURITY DEFINER (dlw_system) because dlw_app may not update audit rows; tenant and actor come from the context only. Raises 42501 without context.';

REVOKE ALL ON FUNCTION dlw.audit_repeat(text, text, jsonb), dlw.audit_repeat_in(bigint, text, text, text, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.audit_repeat(text, text, jsonb) TO dlw_app;

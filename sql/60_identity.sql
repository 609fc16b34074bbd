-- owner: dlw_system
-- Identity lookups that must cross tenants because the tenant is not known yet: a login
-- finds a returning user by (issuer, subject); a machine token finds its service account;
-- the service token may name a tenant. SECURITY DEFINER, owned by dlw_system (BYPASSRLS),
-- search_path pinned, EXECUTE for dlw_app only, and listed in app/ops/catalog_check.py's allowlist.


-- The signature before migration 0010 took no email_verified flag: gone, so nothing can store an
-- address without saying whether the provider verified it.
DROP FUNCTION IF EXISTS dlw.login_user(text, text, text, text, text);

CREATE OR REPLACE FUNCTION dlw.login_user(
    p_issuer text, p_subject text, p_email text, p_email_verified boolean, p_rule_tenant text, p_rule_role text
) RETURNS TABLE (outcome text, tenant_id bigint, user_id uuid, role text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_actor  text := format('oidc:%s#%s', p_issuer, p_subject);
    -- Only an address the provider verified for this identity is kept, anywhere: an unverified
    -- one could be anybody's (a user may type a colleague's address at many providers).
    v_email  text := CASE WHEN p_email_verified IS TRUE THEN nullif(btrim(p_email), '') END;
    v_user   dlw.users%ROWTYPE;
    v_tenant dlw.tenants%ROWTYPE;
BEGIN
    -- A returning user keeps the tenant and role they were given; rules are not re-applied.
    SELECT * INTO v_user FROM dlw.users u WHERE u.issuer = p_issuer AND u.subject = p_subject;
    IF FOUND THEN
        SELECT * INTO STRICT v_tenant FROM dlw.tenants t WHERE t.tenant_id = v_user.tenant_id;
        IF NOT v_tenant.active THEN
            PERFORM dlw.audit_repeat_in(v_tenant.tenant_id, v_actor, 'auth.login_denied', v_user.id::text,
                                        jsonb_build_object('reason', 'TENANT_INACTIVE'));
            RETURN QUERY SELECT 'TENANT_INACTIVE'::text, v_tenant.tenant_id, v_user.id, v_user.role;
            RETURN;
        END IF;
        -- The stored email is the one verified at this login, or none: an address the provider
        -- no longer vouches for is not kept either.
        UPDATE dlw.users u SET last_login_at = now(), email = v_email, email_verified = v_email IS NOT NULL
        WHERE u.tenant_id = v_user.tenant_id AND u.id = v_user.id;
        PERFORM dlw.audit_append(v_user.tenant_id, v_actor, 'auth.login', v_user.id::text,
                                 jsonb_build_object('first_login', false, 'email_verified', v_email IS NOT NULL));
        RETURN QUERY SELECT 'ok'::text, v_user.tenant_id, v_user.id, v_user.role;
        RETURN;
    END IF;

    IF p_rule_tenant IS NOT NULL THEN
        SELECT * INTO v_tenant FROM dlw.tenants t
         WHERE dlw.cross_tenant_key(t.slug) = dlw.cross_tenant_key(p_rule_tenant) AND t.active;
    END IF;
    IF p_rule_tenant IS NULL OR v_tenant.tenant_id IS NULL THEN
        -- No tenant to hold the row: denied logins without one go to the platform tenant.
        PERFORM dlw.audit_repeat_in((SELECT f.platform_tenant_id FROM dlw.domain_facts() f), v_actor,
            'auth.login_denied', NULL,
            jsonb_build_object('reason', 'TENANT_UNRESOLVED', 'email', v_email, 'rule_tenant', p_rule_tenant));
        RETURN QUERY SELECT 'TENANT_UNRESOLVED'::text, NULL::bigint, NULL::uuid, NULL::text;
        RETURN;
    END IF;

    INSERT INTO dlw.users AS u (tenant_id, issuer, subject, email, email_verified, role, last_login_at)
    VALUES (v_tenant.tenant_id, p_issuer, p_subject, v_email, v_email IS NOT NULL, p_rule_role, now())
    ON CONFLICT (issuer, subject) DO NOTHING
    RETURNING * INTO v_user;
    IF v_user.id IS NULL THEN
        -- A concurrent first login of the same identity won the race: use its row.
        SELECT * INTO STRICT v_user FROM dlw.users u WHERE u.issuer = p_issuer AND u.subject = p_subject;
    END IF;
    PERFORM dlw.audit_append(v_user.tenant_id, v_actor, 'auth.login', v_user.id::text,
                             jsonb_build_object('first_login', true, 'role', v_user.role,
                                                'email_verified', v_email IS NOT NULL));
    RETURN QUERY SELECT 'ok'::text, v_user.tenant_id, v_user.id, v_user.role;
END
$$;
COMMENT ON FUNCTION dlw.login_user(text, text, text, boolean, text, text) IS
    'Login of a verified OIDC identity: a known (issuer, subject) keeps its tenant and role; a new one is placed in the tenant and role its first matching rule named, if that tenant exists and is active. The email is stored (and audited) only when p_email_verified is true, else NULL, at every login. Outcome ok | TENANT_UNRESOLVED | TENANT_INACTIVE; audited either way, a denied login as a repeat row (dlw.audit_repeat_in: one per tenant, login subject, user and UTC minute, whose count grows).';

CREATE OR REPLACE FUNCTION dlw.find_service_account(p_issuer text, p_client_id text)
RETURNS TABLE (tenant_id bigint, account_id uuid, role text, tenant_active boolean)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tenant_id, s.id, s.role, t.active
    FROM dlw.service_accounts s JOIN dlw.tenants t ON t.tenant_id = s.tenant_id
    WHERE s.issuer = p_issuer AND s.client_id = p_client_id
$$;
COMMENT ON FUNCTION dlw.find_service_account(text, text) IS
    'Service accounts registered for an identity-provider client; the API accepts the token only when exactly one matches.';

CREATE OR REPLACE FUNCTION dlw.resolve_tenant(p_ref text)
RETURNS TABLE (tenant_id bigint, slug text, active boolean)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tenant_id, t.slug, t.active FROM dlw.tenants t
    WHERE CASE WHEN p_ref ~ '^[0-9]{1,18}$' THEN t.tenant_id = p_ref::bigint ELSE t.slug = p_ref END
$$;
COMMENT ON FUNCTION dlw.resolve_tenant(text) IS
    'Finds a tenant by id or slug. The API calls it only for system_admin principals (X-DLW-Tenant) and the token CLI.';

REVOKE ALL ON FUNCTION dlw.login_user(text, text, text, boolean, text, text), dlw.find_service_account(text, text),
    dlw.resolve_tenant(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.login_user(text, text, text, boolean, text, text), dlw.find_service_account(text, text),
    dlw.resolve_tenant(text) TO dlw_app;

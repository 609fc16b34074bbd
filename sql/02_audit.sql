-- owner: dlw_owner
-- The audit trail: every row of dlw.audit_log is appended by dlw.audit_append, the only
-- INSERT INTO dlw.audit_log in the program. Invoker rights: as dlw_app the row lands only in
-- the context's tenant (RLS WITH CHECK); definer functions owned by dlw_system write any
-- tenant's trail. The wrappers choose the actor: dlw.audit (the API: the context's tenant and
-- principal) and dlw.admin_audit (sql/91_dlw_admin_helpers.sql: session_user, the DBA's login).

CREATE OR REPLACE FUNCTION dlw.audit_append(
    p_tenant_id bigint, p_actor text, p_action text, p_target text, p_detail jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog
AS $$
DECLARE
    -- The id is chosen here, not read back with RETURNING: that would need the SELECT policy,
    -- which admits only admins, while every role in a context may append.
    v_id uuid := dlw.new_id();
BEGIN
    INSERT INTO dlw.audit_log (tenant_id, id, actor, action, target, detail)
    VALUES (p_tenant_id, v_id, p_actor, p_action, p_target, coalesce(p_detail, '{}'::jsonb));
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION dlw.audit_append(bigint, text, text, text, jsonb) IS
    'Appends one row to a tenant''s audit trail (detail NULL = {}); returns its id. The one writer of dlw.audit_log. Invoker rights: RLS decides which tenant a dlw_app caller may write.';

CREATE OR REPLACE FUNCTION dlw.audit(p_action text, p_target text, p_detail jsonb DEFAULT '{}'::jsonb)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog
AS $$
    SELECT dlw.audit_append(dlw.ctx_tenant_id(), dlw.ctx_user_id(), p_action, p_target, p_detail);
$$;
COMMENT ON FUNCTION dlw.audit(text, text, jsonb) IS
    'Appends an audit row to the current tenant''s trail, as the current actor (tenant context required).';

REVOKE ALL ON FUNCTION dlw.audit_append(bigint, text, text, text, jsonb), dlw.audit(text, text, jsonb) FROM PUBLIC;
-- dlw_app may INSERT into dlw.audit_log under RLS anyway, so audit_append adds no power.
GRANT EXECUTE ON FUNCTION dlw.audit_append(bigint, text, text, text, jsonb) TO dlw_app, dlw_system;
GRANT EXECUTE ON FUNCTION dlw.audit(text, text, jsonb) TO dlw_app;

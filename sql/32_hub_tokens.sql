-- owner: dlw_owner
-- The tenant's hub token (dlw.hub_tokens, migrations/0015.hub_resolution.sql): set (again =
-- rotate), clear, and read back as ciphertext for task creation. The API encrypts and decrypts;
-- the database never sees the token in the clear. Invoker rights: row-level security decides
-- (read by tenant_admin/tenant_operator in their own tenant, written by tenant_admin only).
-- Audit rows say that the token was set, rotated or cleared, never what it is.

CREATE OR REPLACE FUNCTION dlw.set_hub_token(p_ciphertext bytea) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant  bigint := dlw.ctx_tenant_id();
    v_rotated boolean;
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.set_hub_token: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    -- xmax <> 0 on the returned row: the upsert updated an existing row (a rotation).
    INSERT INTO dlw.hub_tokens AS h (tenant_id, ciphertext, set_at, set_by)
    VALUES (v_tenant, p_ciphertext, now(), dlw.ctx_user_id())
    ON CONFLICT (tenant_id) DO UPDATE SET ciphertext = excluded.ciphertext, set_at = excluded.set_at,
                                          set_by = excluded.set_by
    RETURNING h.xmax <> 0 INTO v_rotated;
    PERFORM dlw.audit(CASE WHEN v_rotated THEN 'hub_token.rotated' ELSE 'hub_token.set' END, 'hub_token', '{}');
    RETURN CASE WHEN v_rotated THEN 'rotated' ELSE 'set' END;
END
$$;
COMMENT ON FUNCTION dlw.set_hub_token(bytea) IS
    'Stores the current tenant''s hub token (ciphertext made by the API), replacing any previous one; appends a hub_token.set or hub_token.rotated audit row without the token. Returns set | rotated. Raises 42501 without context or for a role other than tenant_admin/system_admin (row-level security).';

CREATE OR REPLACE FUNCTION dlw.clear_hub_token() RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant bigint := dlw.ctx_tenant_id();
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'dlw.clear_hub_token: no tenant context (call dlw.set_context first)' USING ERRCODE = '42501';
    END IF;
    IF NOT (SELECT dlw.ctx_role()) = ANY ('{tenant_admin,system_admin}'::text[]) THEN
        RAISE EXCEPTION 'dlw.clear_hub_token: role % may not clear the hub token', dlw.ctx_role() USING ERRCODE = '42501';
    END IF;
    DELETE FROM dlw.hub_tokens h WHERE h.tenant_id = v_tenant;
    IF NOT FOUND THEN
        RETURN 'NOT_SET';
    END IF;
    PERFORM dlw.audit('hub_token.cleared', 'hub_token', '{}');
    RETURN 'cleared';
END
$$;
COMMENT ON FUNCTION dlw.clear_hub_token() IS
    'Deletes the current tenant''s hub token, with a hub_token.cleared audit row. Returns cleared | NOT_SET. Raises 42501 without context or for a role other than tenant_admin/system_admin.';

CREATE OR REPLACE FUNCTION dlw.hub_token_ciphertext() RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT h.ciphertext FROM dlw.hub_tokens h WHERE h.tenant_id = dlw.ctx_tenant_id();
$$;
COMMENT ON FUNCTION dlw.hub_token_ciphertext() IS
    'The current tenant''s hub token as stored (ciphertext; the API decrypts it to ask the hub), or NULL. Row-level security applies: a viewer or another tenant reads NULL.';

CREATE OR REPLACE FUNCTION dlw.hub_token_status(OUT is_set boolean, OUT set_at timestamptz, OUT set_by text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT h.tenant_id IS NOT NULL, h.set_at, h.set_by
      FROM (SELECT 1) one
      LEFT JOIN dlw.hub_tokens h ON h.tenant_id = dlw.ctx_tenant_id();
$$;
COMMENT ON FUNCTION dlw.hub_token_status() IS
    'Whether the current tenant has a hub token, when and by whom it was set; never the token.';

REVOKE ALL ON FUNCTION dlw.set_hub_token(bytea), dlw.clear_hub_token(), dlw.hub_token_ciphertext(),
    dlw.hub_token_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.set_hub_token(bytea), dlw.clear_hub_token(), dlw.hub_token_ciphertext(),
    dlw.hub_token_status() TO dlw_app;

-- owner: dlw_system
-- Storage target config (issue 15): a target may name a root directory and a layout; two
-- tenants' roots are never the same directory or one inside the other. The triggers that call
-- these are in sql/22_storage_target_triggers.sql; the registry is dlw.storage_roots
-- (migrations/0024.storage_roots.sql).

CREATE OR REPLACE FUNCTION dlw.storage_layouts() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT '{tree,hf-cache}'::text[];
END;
COMMENT ON FUNCTION dlw.storage_layouts() IS
$c$The layouts a storage target's config may name (mirrored as app.domain.STORAGE_LAYOUTS): tree = <root>/<repo>/<revision>/<path>; hf-cache = the Hugging Face hub cache (models--org--name/blobs, snapshots/<commit>, refs/<revision>). Default tree.$c$;

CREATE OR REPLACE FUNCTION dlw.storage_target_config_check(p_config jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_key  text;
    v_root text;
BEGIN
    IF jsonb_typeof(p_config) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'a storage target config is a JSON object' USING ERRCODE = 'DLW20';
    END IF;
    -- Secrets first: a key that names a credential is refused whatever else is wrong, so the
    -- message never depends on the secret's value (which is never echoed).
    FOR v_key IN SELECT k FROM jsonb_object_keys(p_config) AS k ORDER BY k LOOP
        IF v_key ~* '(token|passw|secret|key|credential|auth|cookie|signature)' THEN
            RAISE EXCEPTION 'storage target config key "%" names a secret: secrets are never stored in a config', left(v_key, 64)
                USING ERRCODE = 'DLW21';
        END IF;
    END LOOP;
    FOR v_key IN SELECT k FROM jsonb_object_keys(p_config) AS k ORDER BY k LOOP
        IF v_key NOT IN ('root', 'layout') THEN
            RAISE EXCEPTION 'unknown storage target config key "%" (known: root, layout)', left(v_key, 64)
                USING ERRCODE = 'DLW20';
        END IF;
    END LOOP;
    IF p_config ? 'layout' AND (jsonb_typeof(p_config -> 'layout') <> 'string'
                                OR NOT (p_config ->> 'layout') = ANY (dlw.storage_layouts())) THEN
        RAISE EXCEPTION 'unknown storage layout (known: %)', array_to_string(dlw.storage_layouts(), ', ')
            USING ERRCODE = 'DLW23';
    END IF;
    IF p_config ? 'root' THEN
        IF jsonb_typeof(p_config -> 'root') <> 'string' THEN
            RAISE EXCEPTION 'a storage root is a string' USING ERRCODE = 'DLW22';
        END IF;
        v_root := p_config ->> 'root';
        -- Absolute and normalized, so that string prefixes are directory nesting: no trailing
        -- slash, no empty, "." or ".." segment, no control character, not "/" itself.
        IF length(v_root) > 1024 OR v_root !~ '^(/[^/]+)+$' OR v_root ~ '/\.\.?(/|$)' OR v_root ~ '[[:cntrl:]]' THEN
            RAISE EXCEPTION 'a storage root is an absolute, normalized directory path (no trailing slash, no . or .. segment, at most 1024 characters)'
                USING ERRCODE = 'DLW22';
        END IF;
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.storage_target_config_check(jsonb) IS
$c$Validates a storage target config: a JSON object with at most the keys root (an absolute, normalized directory path: DLW22 otherwise) and layout (one of dlw.storage_layouts(): DLW23 otherwise); a key naming a credential (token, password, secret, key, auth, ...) is DLW21, any other key DLW20. Called by the trigger storage_targets_validate.$c$;

CREATE OR REPLACE FUNCTION dlw.storage_root_sync(p_tenant bigint, p_target uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_root text;
BEGIN
    -- Only for the caller's own tenant (a superuser session, e.g. a DBA's script, may act for any).
    IF p_tenant IS DISTINCT FROM dlw.ctx_tenant_id()
       AND NOT coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user), false) THEN
        RAISE EXCEPTION 'dlw.storage_root_sync: not the tenant in context' USING ERRCODE = '42501';
    END IF;
    -- The registry follows the target as it is now (this function reads it, never its caller's word).
    SELECT s.config ->> 'root' INTO v_root FROM dlw.storage_targets s WHERE s.tenant_id = p_tenant AND s.id = p_target;
    IF v_root IS NULL THEN
        DELETE FROM dlw.storage_roots r WHERE r.tenant_id = p_tenant AND r.target_id = p_target;
        RETURN;
    END IF;
    -- Race-free: every registration queues on one transaction lock, and the check below is a later
    -- statement, so at READ COMMITTED it sees every root a rival committed before we got the lock.
    IF current_setting('transaction_isolation') = 'repeatable read' THEN
        RAISE EXCEPTION 'storage roots cannot be set at REPEATABLE READ' USING ERRCODE = '25000';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('dlw.storage_roots', 0));
    IF EXISTS (SELECT 1 FROM dlw.storage_roots r
                WHERE r.tenant_id <> p_tenant
                  AND (r.root = v_root OR starts_with(v_root, r.root || '/') OR starts_with(r.root, v_root || '/'))) THEN
        -- Says neither whose root nor which: only that this directory is not available.
        RAISE EXCEPTION 'this storage root is not available (it is, contains or lies inside a root in use)'
            USING ERRCODE = 'DLW24';
    END IF;
    INSERT INTO dlw.storage_roots AS r (tenant_id, target_id, root) VALUES (p_tenant, p_target, v_root)
    ON CONFLICT (tenant_id, target_id) DO UPDATE SET root = EXCLUDED.root;
END
$$;
COMMENT ON FUNCTION dlw.storage_root_sync(bigint, uuid) IS
$c$Makes dlw.storage_roots hold the target's current root (config->>'root'; none: its row is removed). Raises DLW24 when another tenant's root equals it, contains it or lies inside it (the error names neither), checked under one transaction advisory lock (25000 at REPEATABLE READ, where the check could miss a rival); 42501 for a tenant other than the context's (superuser sessions excepted). Called by the trigger storage_targets_root after every insert or config update.$c$;

REVOKE ALL ON FUNCTION dlw.storage_layouts(), dlw.storage_target_config_check(jsonb),
    dlw.storage_root_sync(bigint, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.storage_layouts(), dlw.storage_target_config_check(jsonb),
    dlw.storage_root_sync(bigint, uuid) TO dlw_app, dlw_system, dlw_owner;

-- owner: dlw_owner
-- The storage-target triggers of issue 15 (functions in sql/19_storage_roots.sql): a config is
-- validated before it is written, and its root registered (or refused) after.

CREATE OR REPLACE FUNCTION dlw.storage_target_config_trigger() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM dlw.storage_target_config_check(NEW.config);
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.storage_target_config_trigger() IS
    'Trigger of dlw.storage_targets (before insert or an update of config): dlw.storage_target_config_check(NEW.config).';

CREATE OR REPLACE FUNCTION dlw.storage_target_root_trigger() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.config IS DISTINCT FROM OLD.config THEN
        PERFORM dlw.storage_root_sync(NEW.tenant_id, NEW.id);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.storage_target_root_trigger() IS
    'Trigger of dlw.storage_targets (after insert or an update of config): dlw.storage_root_sync for the row, which refuses a root overlapping another tenant''s.';

-- Named so that it fires after storage_targets_limits (triggers fire in name order): an oversized
-- config is refused for its size before its content is read.
CREATE OR REPLACE TRIGGER storage_targets_validate
    BEFORE INSERT OR UPDATE OF config ON dlw.storage_targets
    FOR EACH ROW EXECUTE FUNCTION dlw.storage_target_config_trigger();
COMMENT ON TRIGGER storage_targets_validate ON dlw.storage_targets IS
    'Config validation: see dlw.storage_target_config_check(jsonb)';

CREATE OR REPLACE TRIGGER storage_targets_root
    AFTER INSERT OR UPDATE OF config ON dlw.storage_targets
    FOR EACH ROW EXECUTE FUNCTION dlw.storage_target_root_trigger();
COMMENT ON TRIGGER storage_targets_root ON dlw.storage_targets IS
    'Cross-tenant root registry: see dlw.storage_root_sync(bigint, uuid)';

REVOKE ALL ON FUNCTION dlw.storage_target_config_trigger(), dlw.storage_target_root_trigger() FROM PUBLIC;

-- owner: dlw_owner
-- The storage-target triggers of issue 15 (functions in sql/19_storage_roots.sql): a config is
-- validated before it is written, and its root registered (or refused) after; a task without a
-- commit is refused on an hf-cache target.

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
    -- Only when a root is or was there: a target without one (every tenant's default, made by
    -- provisioning outside the tenant's context) has nothing to register.
    IF NEW.config ? 'root' OR (TG_OP = 'UPDATE' AND OLD.config ? 'root') THEN
        PERFORM dlw.storage_root_sync(NEW.tenant_id, NEW.id);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.storage_target_root_trigger() IS
    'Trigger of dlw.storage_targets (after insert or an update of config): dlw.storage_root_sync for the row when its config has or had a root, which refuses a root overlapping another tenant''s.';

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

-- An hf-cache snapshot is named by its commit: a task without one cannot go there, so it is refused
-- when it is created rather than failed by executors later.
CREATE OR REPLACE FUNCTION dlw.task_storage_layout_trigger() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW."commit" IS NULL AND NOT dlw.hex_digits_ok(NEW.revision, 40) AND EXISTS (
        SELECT 1 FROM dlw.storage_targets s
         WHERE s.tenant_id = NEW.tenant_id AND s.id = NEW.storage_target_id AND s.config ->> 'layout' = 'hf-cache') THEN
        RAISE EXCEPTION 'the storage target has the hf-cache layout, which needs the task''s commit: this task has none (the hub could not be asked)'
            USING ERRCODE = 'DLW25';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.task_storage_layout_trigger() IS
    'Trigger of dlw.tasks (before insert): DLW25 for a task without a resolved commit (and a revision that is not one) on an hf-cache storage target, whose snapshots are named by commit.';

CREATE OR REPLACE TRIGGER tasks_storage_layout
    BEFORE INSERT ON dlw.tasks
    FOR EACH ROW EXECUTE FUNCTION dlw.task_storage_layout_trigger();
COMMENT ON TRIGGER tasks_storage_layout ON dlw.tasks IS
    'hf-cache targets take only tasks with a commit: see dlw.task_storage_layout_trigger()';

REVOKE ALL ON FUNCTION dlw.storage_target_config_trigger(), dlw.storage_target_root_trigger(),
    dlw.task_storage_layout_trigger() FROM PUBLIC;

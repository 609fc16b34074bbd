-- owner: dlw_owner
-- Deleting a task's files (issue 15; docs/storage.md "Deleting"): the rules, in one place.
-- The entry points (the API's request, the executors' claim and reports) are the definer
-- functions of sql/44_executor_deletions.sql; these helpers run inside them (invoker rights,
-- EXECUTE for dlw_system only), plus the guard trigger that keeps tasks.deletion theirs.
--
-- Who holds a file. A deletion removes a path or blob from the target only when no other task
-- of the tenant in the same storage target still holds it: a task not being deleted
-- (deletion IS NULL) with a file at the same place that is succeeded or may still be written
-- (pending, assigned, running). Places:
--   tree      the path <repo_id>/<revision>/<path>
--   hf-cache  the snapshot entry (repo_type, repo_id, commit, path); its blob by content
--             (sha256 within the same repository folder: blobs are per models--org--name);
--             refs/<revision> while another task of the repository has that revision.
-- Storage is released by content across the target (what a storage registry of distinct blobs
-- per target counts): a sha256 the deletion removed that no task not yet deleted holds
-- (dlw.task_deletion_released). A task whose deletion is running or failed still holds its
-- content for the release, so two deletions of a shared blob release it once, at the last.

CREATE OR REPLACE FUNCTION dlw.task_deletion_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.deletion IS NOT NULL OR NEW.deleted_at IS NOT NULL THEN
            RAISE EXCEPTION 'a task is inserted without a deletion' USING ERRCODE = 'DLW01';
        END IF;
        RETURN NEW;
    END IF;
    -- Only the definer functions of dlw_system (sql/44_executor_deletions.sql) mark deletions:
    -- a tenant role writing tasks through RLS cannot pretend its files were removed.
    IF (NEW.deletion IS DISTINCT FROM OLD.deletion OR NEW.deleted_at IS DISTINCT FROM OLD.deleted_at)
       AND current_user <> 'dlw_system'
       AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'tasks.deletion is written by dlw.delete_task and the executors only'
            USING ERRCODE = '42501';
    END IF;
    IF OLD.deletion IS NOT NULL AND NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'illegal task transition: % -> % (the task is %)', OLD.status, NEW.status, OLD.deletion
            USING ERRCODE = 'DLW01', HINT = 'a task being deleted or deleted keeps its status';
    END IF;
    IF NEW.deletion IS NOT NULL AND NEW.status IN ('pending', 'running') THEN
        RAISE EXCEPTION 'only a finished task is deleted (task % is %)', OLD.id, NEW.status USING ERRCODE = 'DLW01';
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION dlw.task_deletion_guard() IS
    'BEFORE INSERT OR UPDATE trigger of dlw.tasks: tasks are inserted without a deletion; only dlw_system (its definer functions) or a superuser changes deletion/deleted_at (42501); a deletion needs a finished task and freezes its status (DLW01).';

CREATE OR REPLACE TRIGGER tasks_deletion_guard
    BEFORE INSERT OR UPDATE ON dlw.tasks
    FOR EACH ROW EXECUTE FUNCTION dlw.task_deletion_guard();
COMMENT ON TRIGGER tasks_deletion_guard ON dlw.tasks IS 'Deletion marker of a task: see dlw.task_deletion_guard()';

CREATE OR REPLACE FUNCTION dlw.task_deletion_plan(p_tenant_id bigint, p_task_id uuid) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH t AS (
        SELECT x.tenant_id, x.id, x.storage_target_id, x.repo_type, x.repo_id, x.revision, x."commit",
               st.config ->> 'root' AS root, coalesce(st.config ->> 'layout', 'tree') AS layout
          FROM dlw.tasks x
          JOIN dlw.storage_targets st ON st.tenant_id = x.tenant_id AND st.id = x.storage_target_id
         WHERE x.tenant_id = p_tenant_id AND x.id = p_task_id
    ), others AS (
        -- The tasks that hold: same tenant, target and repository, not being deleted.
        SELECT y.id, y.repo_type, y.revision, y."commit"
          FROM t JOIN dlw.tasks y
            ON y.tenant_id = t.tenant_id AND y.storage_target_id = t.storage_target_id AND y.repo_id = t.repo_id
         WHERE y.id <> t.id AND y.deletion IS NULL AND y.repo_type = t.repo_type
    ), files AS (
        SELECT f.id, f.path, f.sha256, f.size, f.status,
               EXISTS (SELECT 1 FROM others o JOIN dlw.task_files g ON g.tenant_id = t.tenant_id AND g.task_id = o.id
                        WHERE g.path = f.path AND g.status IN ('pending', 'assigned', 'running', 'succeeded')
                          AND CASE WHEN t.layout = 'hf-cache'
                                   THEN coalesce(o."commit", o.revision) = coalesce(t."commit", t.revision)
                                   ELSE o.revision = t.revision END) AS path_held,
               -- hf-cache blobs, by content within the repository folder (unknown content: held
               -- by any file of the folder whose content is unknown too, or at the same path).
               EXISTS (SELECT 1 FROM others o JOIN dlw.task_files g ON g.tenant_id = t.tenant_id AND g.task_id = o.id
                        WHERE g.status IN ('pending', 'assigned', 'running', 'succeeded')
                          AND (g.sha256 = f.sha256
                               OR (f.sha256 IS NULL AND (g.sha256 IS NULL OR g.path = f.path)))) AS blob_held
          FROM t JOIN dlw.task_files f ON f.tenant_id = t.tenant_id AND f.task_id = t.id
    )
    SELECT jsonb_build_object(
               'layout', t.layout, 'root', t.root, 'repo_type', t.repo_type, 'repo_id', t.repo_id,
               'revision', t.revision, 'commit', t."commit",
               'remove_ref', t.layout = 'hf-cache' AND t.revision IS DISTINCT FROM t."commit"
                             AND NOT EXISTS (SELECT 1 FROM others o WHERE o.revision = t.revision),
               'files', coalesce((SELECT jsonb_agg(jsonb_build_object(
                                     'id', f.id, 'path', f.path, 'sha256', f.sha256, 'size', f.size,
                                     'remove_path', NOT f.path_held,
                                     'remove_blob', t.layout = 'hf-cache' AND NOT f.path_held AND NOT f.blob_held)
                                     ORDER BY f.path)
                                    FROM files f), '[]'::jsonb))
      FROM t;
$$;
COMMENT ON FUNCTION dlw.task_deletion_plan(bigint, uuid) IS
$c$Internal (dlw_system, at the claim of a deletion): what an executor removes for the task's deletion, as {layout, root, repo_type, repo_id, revision, commit, remove_ref, files: [{id, path, sha256, size, remove_path, remove_blob}]}. A path (tree: <repo_id>/<revision>/<path>; hf-cache: snapshots/<commit>/<path>) is removed unless another task of the tenant in the same target and repository, not being deleted, has a file there that is succeeded or may still be written; an hf-cache blob also unless such a file has the same sha256 (unknown content: the same path or unknown content too); refs/<revision> unless such a task has the revision. Partial downloads of every file (named after its id) are removed in any case.$c$;

-- Was a STABLE SQL function computing the release on its own; it now hands the release to the
-- storage registry (one truth for storage used), so its volatility changes.
DROP FUNCTION IF EXISTS dlw.task_deletion_released(bigint, uuid);
CREATE FUNCTION dlw.task_deletion_released(p_tenant_id bigint, p_deletion_id uuid)
RETURNS TABLE (storage_target_id uuid, sha256 text, bytes bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_task    uuid;
    v_target  uuid;
    v_shas    text[];
BEGIN
    -- The one place that decides what a completed deletion frees. The deleted task's files stop
    -- referencing their contents; the storage registry (dlw.storage_release, sql/23_stored_blobs.sql)
    -- then drops the contents no other file of the target references and subtracts their bytes.
    -- A task whose deletion is still under way or failed keeps its references, so two deletions
    -- of shared content release it once, at the last.
    SELECT d.task_id, x.storage_target_id INTO v_task, v_target
      FROM dlw.task_deletions d
      JOIN dlw.tasks x ON x.tenant_id = d.tenant_id AND x.id = d.task_id
     WHERE d.tenant_id = p_tenant_id AND d.id = p_deletion_id;
    SELECT array_agg(DISTINCT f.blob_sha256 ORDER BY f.blob_sha256) INTO v_shas
      FROM dlw.task_files f
     WHERE f.tenant_id = p_tenant_id AND f.task_id = v_task AND f.blob_sha256 IS NOT NULL;
    IF v_shas IS NULL THEN  -- nothing referenced (dlw.storage_release would take NULL as "all")
        RETURN;
    END IF;
    UPDATE dlw.task_files f SET blob_sha256 = NULL, stored_path = NULL
     WHERE f.tenant_id = p_tenant_id AND f.task_id = v_task AND f.blob_sha256 IS NOT NULL;
    RETURN QUERY
    SELECT v_target, r.sha256, r.size FROM dlw.storage_release(p_tenant_id, v_target, v_shas) r ORDER BY r.sha256;
END
$$;
COMMENT ON FUNCTION dlw.task_deletion_released(bigint, uuid) IS
    'Internal (dlw_system, at the completion of a deletion, in its transaction): releases the storage the deletion frees and returns it, one row per (storage_target_id, sha256, bytes). The task''s files stop referencing their contents (task_files.blob_sha256 and stored_path cleared) and dlw.storage_release drops the contents of the target no other file references (no other task of the tenant in that target, deleted ones excluded, has a succeeded file of that sha256), subtracting their bytes from storage used. Content another file still uses stays registered (its bytes on disk are that file''s hard link or its own copy).';

REVOKE ALL ON FUNCTION dlw.task_deletion_guard(), dlw.task_deletion_plan(bigint, uuid),
    dlw.task_deletion_released(bigint, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.task_deletion_plan(bigint, uuid), dlw.task_deletion_released(bigint, uuid) TO dlw_system;

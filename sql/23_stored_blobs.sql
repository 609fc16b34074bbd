-- owner: dlw_system
-- Deduplication within a storage target and the storage a tenant uses (issue 15; tables in
-- migrations/0026.stored_blobs.sql, docs/storage.md "Deduplication" and "Storage quota").
--
-- The registry dlw.stored_blobs holds, per tenant and target, each distinct content (sha256)
-- stored there. A completion adds its contents (dlw.storage_record_set, one statement for a
-- batch); the claim offers a file whose declared sha256 is registered the path of the verified
-- copy, and the executor places it
-- from there (a hard link) instead of downloading it. dlw.storage_release drops the contents no
-- file uses any more (for deletions). Every change of the registry appends a change row to
-- dlw.storage_usage, so the bytes stored are one summary row plus few changes
-- (dlw.storage_used_bytes); admission folds them (dlw.storage_usage_fold).
--
-- Never across tenants or targets: every lookup is keyed by (tenant_id, target_id, sha256).

CREATE OR REPLACE FUNCTION dlw.storage_record_set(
    p_tenant_ids bigint[], p_target_ids uuid[], p_sha256s text[], p_sizes bigint[], p_paths text[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_added integer;
BEGIN
    -- One upsert for the set, so the rows are locked until commit: a concurrent
    -- dlw.storage_release of a content waits, then sees the files referencing it. Each content
    -- once (a second row of it would be a second update of the same row in one statement), with
    -- the first copy in path order (as one call per file in that order registered it), taken in
    -- (tenant_id, target_id, sha256) order: two sets registering the same contents lock the
    -- registry rows in one order and never wait for each other in a cycle. A row without a copy
    -- gets this one.
    WITH given AS (
        SELECT DISTINCT ON (u.t, u.target, u.sha) u.t, u.target, u.sha, u.size, u.path
          FROM unnest(p_tenant_ids, p_target_ids, p_sha256s, p_sizes, p_paths) AS u(t, target, sha, size, path)
         ORDER BY u.t, u.target, u.sha, u.path NULLS LAST
    ), upserted AS (
        INSERT INTO dlw.stored_blobs AS b (tenant_id, target_id, sha256, size, path)
        SELECT g.t, g.target, g.sha, g.size, g.path FROM given g ORDER BY g.t, g.target, g.sha
        ON CONFLICT (tenant_id, target_id, sha256) DO UPDATE SET path = coalesce(b.path, EXCLUDED.path)
        RETURNING b.tenant_id, b.size, b.xmax = 0 AS added
    ), counted AS (
        -- New contents count for storage: one +size change row of dlw.storage_usage per tenant.
        INSERT INTO dlw.storage_usage (tenant_id, folded, bytes)
        SELECT x.tenant_id, false, sum(x.size) FROM upserted x WHERE x.added GROUP BY x.tenant_id
    )
    SELECT count(*) FILTER (WHERE x.added) INTO v_added FROM upserted x;
    RETURN v_added;
END
$$;
COMMENT ON FUNCTION dlw.storage_record_set(bigint[], uuid[], text[], bigint[], text[]) IS
    'Internal (dlw_system, inside dlw.executor_complete_set): registers verified contents in one statement, given as parallel arrays (tenant, target, sha256, size bytes, path relative to the target''s base directory; NULL = unknown) in any order, in (tenant_id, target_id, sha256) order, each content once (its first path in path order as its copy). A new content counts its bytes for storage (one +sum change row of dlw.storage_usage per tenant); an existing row keeps its copy (or takes the path if it had none) and counts nothing. Returns how many contents were new.';

CREATE OR REPLACE FUNCTION dlw.storage_record(
    p_tenant_id bigint, p_target_id uuid, p_sha256 text, p_size bigint, p_path text
) RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
RETURN dlw.storage_record_set(ARRAY[p_tenant_id], ARRAY[p_target_id], ARRAY[p_sha256], ARRAY[p_size], ARRAY[p_path]) > 0;
COMMENT ON FUNCTION dlw.storage_record(bigint, uuid, text, bigint, text) IS
    'Internal (dlw_system): dlw.storage_record_set for one content: registers p_sha256 (p_size bytes) in the tenant''s target with p_path as its copy, counting its bytes for storage when it is new. Returns whether the content was new.';

CREATE OR REPLACE FUNCTION dlw.storage_release(
    p_tenant_id bigint, p_target_id uuid, p_sha256 text[] DEFAULT NULL
) RETURNS TABLE (sha256 text, size bigint, path text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- Lock the candidates first (in key order); the checks are later statements, so at READ
    -- COMMITTED they see every completion that committed while this waited (dlw.storage_record
    -- holds the row it upserts until its commit).
    PERFORM 1 FROM dlw.stored_blobs b
     WHERE b.tenant_id = p_tenant_id AND b.target_id = p_target_id
       AND (p_sha256 IS NULL OR b.sha256 = ANY (p_sha256))
     ORDER BY b.sha256
       FOR UPDATE;
    -- Still used: the copy moves to a remaining file when the registered one is no longer a file's.
    UPDATE dlw.stored_blobs b
       SET path = (SELECT f.stored_path
                     FROM dlw.task_files f
                     JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id
                    WHERE f.tenant_id = b.tenant_id AND f.blob_sha256 = b.sha256
                      AND x.storage_target_id = b.target_id AND f.stored_path IS NOT NULL
                    ORDER BY f.created_at, f.id
                    LIMIT 1)
     WHERE b.tenant_id = p_tenant_id AND b.target_id = p_target_id
       AND (p_sha256 IS NULL OR b.sha256 = ANY (p_sha256))
       AND EXISTS (SELECT 1 FROM dlw.task_files f
                     JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id
                    WHERE f.tenant_id = b.tenant_id AND f.blob_sha256 = b.sha256
                      AND x.storage_target_id = b.target_id AND f.stored_path IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM dlw.task_files f
                         JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id
                        WHERE f.tenant_id = b.tenant_id AND f.blob_sha256 = b.sha256
                          AND x.storage_target_id = b.target_id AND f.stored_path = b.path);
    -- Unused: dropped, and their bytes no longer count.
    RETURN QUERY
    WITH gone AS (
        DELETE FROM dlw.stored_blobs b
         WHERE b.tenant_id = p_tenant_id AND b.target_id = p_target_id
           AND (p_sha256 IS NULL OR b.sha256 = ANY (p_sha256))
           AND NOT EXISTS (SELECT 1 FROM dlw.task_files f
                             JOIN dlw.tasks x ON x.tenant_id = f.tenant_id AND x.id = f.task_id
                            WHERE f.tenant_id = b.tenant_id AND f.blob_sha256 = b.sha256
                              AND x.storage_target_id = b.target_id)
        RETURNING b.sha256, b.size, b.path
    ), counted AS (
        INSERT INTO dlw.storage_usage (tenant_id, folded, bytes)
        SELECT p_tenant_id, false, -sum(g.size) FROM gone g HAVING count(*) > 0
    )
    SELECT g.sha256, g.size, g.path FROM gone g ORDER BY g.sha256;
END
$$;
COMMENT ON FUNCTION dlw.storage_release(bigint, uuid, text[]) IS
$c$Releases a target's contents no file uses any more, for deleting a task's files (issue 15 item 5): call it (as dlw_system, e.g. from a definer function) after the deleted files stopped referencing their blobs (their task_files.blob_sha256 set to NULL, or the rows deleted), in the same transaction. Considers the registry rows of p_target_id of tenant p_tenant_id whose sha256 is in p_sha256 (NULL = all of the target's), locked first. A row some file of a task in that target still references (blob_sha256) stays, its copy (path) moved to such a file's stored_path when its own is no longer one; a row no file references is deleted and its size no longer counts for storage (one -sum change row of dlw.storage_usage).
Returns the deleted rows (sha256, size, path: the copy that was registered) in sha256 order: the contents nothing in the database points to any more, whose bytes the caller may unlink from the target (a file of the deleted task that was a hard link of another remaining file shares its inode, so unlinking a task's own stored_path never takes bytes another file uses).$c$;

CREATE OR REPLACE FUNCTION dlw.storage_used_bytes(p_tenant_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The summary row plus the changes not folded yet (index storage_usage_changes).
    RETURN (SELECT coalesce(sum(u.bytes), 0)::bigint FROM dlw.storage_usage u WHERE u.tenant_id = p_tenant_id);
END
$$;
COMMENT ON FUNCTION dlw.storage_used_bytes(bigint) IS
    'Bytes of the distinct contents (dlw.stored_blobs) the tenant''s targets hold: its dlw.storage_usage summary plus the changes not folded yet. Row-level security applies (another tenant reads 0).';

CREATE OR REPLACE FUNCTION dlw.storage_usage_fold(p_tenant_id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_tenant_id IS DISTINCT FROM dlw.ctx_tenant_id() THEN
        RAISE EXCEPTION 'dlw.storage_usage_fold: not the tenant in context' USING ERRCODE = '42501';
    END IF;
    -- Each change row is deleted by exactly one fold (a concurrent one waits for the rows, then
    -- finds them gone) and added once; a change committed meanwhile stays for the next fold.
    IF EXISTS (SELECT 1 FROM dlw.storage_usage u WHERE u.tenant_id = p_tenant_id AND NOT u.folded) THEN
        WITH changes AS (
            DELETE FROM dlw.storage_usage u WHERE u.tenant_id = p_tenant_id AND NOT u.folded RETURNING u.bytes
        )
        INSERT INTO dlw.storage_usage AS s (tenant_id, folded, bytes)
        SELECT p_tenant_id, true, coalesce(sum(c.bytes), 0) FROM changes c
        ON CONFLICT (tenant_id) WHERE folded DO UPDATE SET bytes = s.bytes + EXCLUDED.bytes;
    END IF;
END
$$;
COMMENT ON FUNCTION dlw.storage_usage_fold(bigint) IS
    'Folds the tenant''s dlw.storage_usage change rows into its summary row, so that dlw.storage_used_bytes stays one row plus the changes since the last fold. Definer (dlw_system: dlw_app may not write the counter); only for the tenant in context (42501 otherwise). Task admission calls it while it holds the tenant''s quota rows.';

REVOKE ALL ON FUNCTION dlw.storage_record_set(bigint[], uuid[], text[], bigint[], text[]),
    dlw.storage_record(bigint, uuid, text, bigint, text), dlw.storage_release(bigint, uuid, text[]),
    dlw.storage_used_bytes(bigint), dlw.storage_usage_fold(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.storage_used_bytes(bigint), dlw.storage_usage_fold(bigint) TO dlw_app;

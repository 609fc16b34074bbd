-- The shape of a stored path (where a file lies, relative to its target's base directory;
-- migrations/0026): one rule, dlw.stored_path_ok, that both constraints use and that the
-- completion's argument check calls (sql/43_executor_batches.sql), instead of three spellings
-- of one regular expression. The API's schema mirrors it (app/api/routes/executor.py), and
-- tests/sql/test_stored_path_rule.py feeds the same samples to both.
--
-- The function lives here, not in sql/: the constraints depend on it, so a change to the rule
-- is a schema change, made by a new migration that re-validates the rows (sql/ is re-applied
-- with CREATE OR REPLACE, which would change the rule under existing rows unchecked).
-- The rule is unchanged: the old constraints' expression, as a function.

SET ROLE dlw_owner;

CREATE FUNCTION dlw.stored_path_ok(p_path text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN length(p_path) <= 4096 AND p_path ~ '^[^/]+(/[^/]+)*$' AND p_path !~ '(^|/)\.\.?(/|$)'
       AND p_path !~ '[\x01-\x1f\x7f-\x9f]';
COMMENT ON FUNCTION dlw.stored_path_ok(text) IS
    'Whether p_path is a stored path: relative, normalized (non-empty segments, none . or ..), at most 4096 characters, no control characters (C0, DEL, C1). NULL for NULL (a CHECK passes it). The rule of the constraints task_files_stored_path and stored_blobs_path and of the completion''s 22023 check; changed only by a migration.';
REVOKE ALL ON FUNCTION dlw.stored_path_ok(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.stored_path_ok(text) TO dlw_app, dlw_system;

-- The same rule, now by name. NOT VALID then VALIDATE: the re-check of existing rows takes no
-- lock that blocks writers.
ALTER TABLE dlw.task_files DROP CONSTRAINT task_files_stored_path,
    ADD CONSTRAINT task_files_stored_path CHECK (dlw.stored_path_ok(stored_path)) NOT VALID;
ALTER TABLE dlw.task_files VALIDATE CONSTRAINT task_files_stored_path;
ALTER TABLE dlw.stored_blobs DROP CONSTRAINT stored_blobs_path,
    ADD CONSTRAINT stored_blobs_path CHECK (dlw.stored_path_ok(path)) NOT VALID;
ALTER TABLE dlw.stored_blobs VALIDATE CONSTRAINT stored_blobs_path;

RESET ROLE;

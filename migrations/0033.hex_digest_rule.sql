-- The shape of a hex digest (a sha256: 64, a commit: 40 lowercase hex digits): one rule,
-- dlw.hex_digits_ok(value, length), for every constraint that spelled it '^[0-9a-f]{N}$' (and
-- for the argument checks in sql/, which call it). Why: PostgreSQL's regular expression engine
-- builds its automaton's states anew on every evaluation, and the bounded repetition {64} makes
-- that 64 states: 6.8 us per value, against 0.6 us for the length and one negated class
-- (100,000 values, one run). A file's row is checked against every CHECK of its table on every
-- update (claim, completion), and its digest is checked again as the completion's argument and
-- as its stored blob's: about a fifth of PostgreSQL's CPU in 500 small files (bench/executor.py).
--
-- The function lives here, not in sql/, for the reason dlw.stored_path_ok does (migrations/0032):
-- the constraints depend on it. The rule is unchanged (the same values pass). Each table's
-- constraints are replaced in one ALTER TABLE, which checks the existing rows in one scan; the
-- migration runs in one transaction, so the table is locked (ACCESS EXCLUSIVE) until it commits
-- (about 0.6 us per row and check: seconds for millions of files).

SET ROLE dlw_owner;

CREATE FUNCTION dlw.hex_digits_ok(p_value text, p_length integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN length(p_value) = p_length AND p_value !~ '[^0-9a-f]';
COMMENT ON FUNCTION dlw.hex_digits_ok(text, integer) IS
    'Whether p_value is exactly p_length lowercase hex digits (as ''^[0-9a-f]{p_length}$'', without building a p_length-state automaton per call). NULL for NULL (a CHECK passes it). The rule of the sha256 and commit constraints and of the executor''s argument checks; changed only by a migration.';
REVOKE ALL ON FUNCTION dlw.hex_digits_ok(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.hex_digits_ok(text, integer) TO dlw_app, dlw_system;

ALTER TABLE dlw.task_files
    DROP CONSTRAINT task_files_sha256_check,
    ADD CONSTRAINT task_files_sha256_check CHECK (dlw.hex_digits_ok(sha256, 64)),
    DROP CONSTRAINT task_files_resume_sha256,
    ADD CONSTRAINT task_files_resume_sha256 CHECK (dlw.hex_digits_ok(resume_sha256, 64)),
    DROP CONSTRAINT task_files_blob_sha256,
    ADD CONSTRAINT task_files_blob_sha256 CHECK (dlw.hex_digits_ok(blob_sha256, 64));

ALTER TABLE dlw.stored_blobs
    DROP CONSTRAINT stored_blobs_sha256,
    ADD CONSTRAINT stored_blobs_sha256 CHECK (dlw.hex_digits_ok(sha256, 64));

ALTER TABLE dlw.tasks
    DROP CONSTRAINT tasks_commit_sha,
    ADD CONSTRAINT tasks_commit_sha CHECK (dlw.hex_digits_ok("commit", 40));

RESET ROLE;

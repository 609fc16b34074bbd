-- Resume: the verified prefix of a file's partial download, kept by the server so that the next
-- attempt on the same storage checks its partial file against it and continues after it
-- (sql/42_executor_reports.sql records it, sql/41_executor_claim.sql hands it out).

SET ROLE dlw_owner;

ALTER TABLE dlw.task_files
    ADD COLUMN resume_bytes bigint NOT NULL DEFAULT 0
        CONSTRAINT task_files_resume_bytes CHECK (resume_bytes >= 0 AND resume_bytes <= size),
    ADD COLUMN resume_sha256 text
        CONSTRAINT task_files_resume_sha256 CHECK (resume_sha256 ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT task_files_resume_pair CHECK ((resume_bytes = 0) = (resume_sha256 IS NULL));
COMMENT ON COLUMN dlw.task_files.resume_bytes IS
    'Length of the prefix an executor wrote, synced and hashed (its last checkpoint); 0 = start from the beginning. Kept when the file returns to the queue, cleared when it succeeds';
COMMENT ON COLUMN dlw.task_files.resume_sha256 IS
    'sha256 of the first resume_bytes bytes: a later attempt keeps its partial file only if its prefix has this hash (NULL when resume_bytes is 0)';

RESET ROLE;

-- Tasks from a repository name (issue 14): the API resolves the revision and the manifest on
-- the Hugging Face Hub before admission. A task keeps the revision as asked and the commit it
-- resolved to (executors download that commit, so a branch that moves later changes nothing),
-- and the kind of repository. Each tenant may store one hub token, encrypted by the API
-- (AES-GCM, key DLW_SECRET_KEY) before it reaches the database: write-only for the API, never
-- granted to reporting logins, handed to executors only with a claim of that tenant's files.

SET ROLE dlw_owner;

ALTER TABLE dlw.tasks
    ADD COLUMN IF NOT EXISTS repo_type text NOT NULL DEFAULT 'model'
        CONSTRAINT tasks_repo_type CHECK (repo_type IN ('model', 'dataset')),
    ADD COLUMN IF NOT EXISTS "commit" text
        CONSTRAINT tasks_commit_sha CHECK ("commit" ~ '^[0-9a-f]{40}$');
COMMENT ON COLUMN dlw.tasks.repo_type IS 'Kind of hub repository: model or dataset';
COMMENT ON COLUMN dlw.tasks."commit" IS
    'The 40-hex commit the revision resolved to on the hub when the task was created; executors download this commit. NULL only for a task whose client-supplied manifest was admitted while the hub could not be asked (executors then download the revision)';

CREATE TABLE dlw.hub_tokens (
    tenant_id   bigint NOT NULL REFERENCES dlw.tenants (tenant_id),
    ciphertext  bytea NOT NULL CONSTRAINT hub_tokens_ciphertext_size CHECK (octet_length(ciphertext) BETWEEN 29 AND 4096),
    set_at      timestamptz NOT NULL DEFAULT now(),
    set_by      text,
    PRIMARY KEY (tenant_id)
);
COMMENT ON TABLE dlw.hub_tokens IS
    'The tenant''s Hugging Face Hub token (at most one), encrypted by the API with AES-GCM under DLW_SECRET_KEY (the tenant id is authenticated with it, so a row moved to another tenant does not decrypt). Write-only: no route returns it, reporting logins have no grant';
COMMENT ON COLUMN dlw.hub_tokens.ciphertext IS 'version byte, 12-byte nonce, AES-256-GCM ciphertext and tag (app/api/hub_secrets.py)';
COMMENT ON COLUMN dlw.hub_tokens.set_at IS 'When the token was last set (setting it again rotates it)';
COMMENT ON COLUMN dlw.hub_tokens.set_by IS 'Who set it: user id or service principal';

ALTER TABLE dlw.hub_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE dlw.hub_tokens FORCE ROW LEVEL SECURITY;

REVOKE ALL ON dlw.hub_tokens FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dlw.hub_tokens TO dlw_app;
GRANT SELECT ON dlw.hub_tokens TO dlw_system;  -- the executor claim hands it out with a claim

RESET ROLE;

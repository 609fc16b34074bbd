-- Identity that cannot be borrowed: dlw.users.email holds only an address the identity
-- provider verified for this identity (email_verified: true in the id_token), written by
-- dlw.login_user (sql/60_identity.sql) alone. Grants and lookups by email (dlw_admin, via
-- dlw.admin_user_id in sql/91_dlw_admin_helpers.sql) accept only a verified, unambiguous one.

SET ROLE dlw_owner;

-- Rows written before this migration carry an address of unknown standing: they stay, marked
-- unverified (so no grant by email reaches them), until the user's next login rewrites them.
ALTER TABLE dlw.users
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT users_verified_email_present CHECK (email IS NOT NULL OR NOT email_verified);
COMMENT ON COLUMN dlw.users.email IS
    'The address the identity provider verified at the latest login (NULL when that login carried no verified email); before migration 0010, possibly an unverified one (email_verified = false)';
COMMENT ON COLUMN dlw.users.email_verified IS
    'True when email was verified by the identity provider (email_verified claim); only such addresses are matched by grants by email';

-- Only the login function writes an email: the API's role may no longer set one (it could have
-- placed any address on a user of its tenant, bypassing the provider's verification).
REVOKE UPDATE (email) ON dlw.users FROM dlw_app;

RESET ROLE;

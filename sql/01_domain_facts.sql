-- owner: dlw_owner
-- Domain facts: the limits and names every layer must agree on, in one place.
--
-- dlw.domain_facts() is the source for the SQL program: functions that enforce a fact read it
-- from here instead of repeating a literal. The tenant quota defaults are the column defaults
-- of dlw.tenants (migrations/0002.schema.sql), and the CHECK constraints of the tables
-- (migrations/, append-only history) repeat some of these facts for raw writes.
-- app/domain.py mirrors all of it for the Python layer; tests/sql/test_domain_facts.py reads
-- this function and the catalog and fails when any copy disagrees.

-- The row grows when a fact is added, and CREATE OR REPLACE cannot change a row type: the
-- function is re-created (nothing depends on it but PL/pgSQL bodies, which bind at run time).
DROP FUNCTION IF EXISTS dlw.domain_facts();
CREATE FUNCTION dlw.domain_facts()
RETURNS TABLE (
    platform_tenant_id          bigint,
    roles                       text[],
    tenant_roles                text[],
    service_account_roles       text[],
    default_max_attempts        integer,
    lease_seconds_min           integer,
    lease_seconds_max           integer,
    claim_max_files             integer,
    tenant_slug_pattern         text,
    display_name_max_length     integer,
    storage_target_name_pattern text,
    login_name_pattern          text,
    login_name_reserved_pattern text,
    storage_target_config_max_bytes integer,
    retry_backoff_base_seconds  integer,
    retry_backoff_max_seconds   integer,
    retry_after_max_seconds     integer,
    storage_gb_bytes            bigint,
    quota_metrics               text[]
)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT 1::bigint,
           '{system_admin,tenant_admin,tenant_operator,tenant_viewer,executor}'::text[],
           '{tenant_admin,tenant_operator,tenant_viewer}'::text[],
           '{tenant_admin,tenant_operator,tenant_viewer,executor}'::text[],
           5,
           5,
           3600,
           100,
           '^[a-z][a-z0-9-]{1,62}$',
           200,
           '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$',
           '^[a-z_][a-z0-9_.@-]{0,62}$',
           '^(pg_|dlw_)',
           16384,
           2,
           300,
           3600,
           1000000000::bigint,
           '{concurrent_tasks,tasks_per_minute,bytes_month,storage_gb}'::text[];
END;
COMMENT ON FUNCTION dlw.domain_facts() IS
$c$The domain facts, one row; mirrored by app/domain.py (tests/sql/test_domain_facts.py keeps them equal).
platform_tenant_id: the tenant of the service token and system_admin principals (it cannot be deactivated; denied logins without a tenant are audited there).
roles: every principal role. tenant_roles: roles a user holds in a tenant (assignable, grantable). service_account_roles: roles of a service account.
default_max_attempts: claims of a file before an expired lease or retryable failure fails it (DLW_EXECUTOR_MAX_ATTEMPTS default).
lease_seconds_min / lease_seconds_max: bounds of an executor lease; claim_max_files: most files one claim returns.
tenant_slug_pattern, display_name_max_length (at least 1), storage_target_name_pattern, login_name_pattern (reporting logins; not matching login_name_reserved_pattern).
storage_target_config_max_bytes: most bytes of a storage target's config (its jsonb as text), enforced by dlw.storage_target_limits().
retry_backoff_base_seconds / retry_backoff_max_seconds: a retryable failure on attempt n waits least(max, base * 2^(n-1) * (1 + random())) seconds before the file is offered again (dlw.retry_backoff), or the hub's Retry-After when longer, itself capped at retry_after_max_seconds.
storage_gb_bytes: bytes in one GB of quota_storage_gb and storage_gb_used (10^9, as disks are sold).
quota_metrics: the metrics a QUOTA_EXCEEDED refusal names, in the order admission checks them (dlw.admission_refusal).
The tenant quota defaults are not here: they are the column defaults of dlw.tenants.$c$;

REVOKE ALL ON FUNCTION dlw.domain_facts() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.domain_facts() TO dlw_app, dlw_system, dlw_login_manager;

"""`dlw doctor`: check the live catalog for the isolation invariants.

Each check is one query returning offending objects; an empty result is a pass. The same
checks run in the test suite against the migrated schema.
"""

from __future__ import annotations

import psycopg

# SECURITY DEFINER functions that are allowed to exist, each with the role that must own it (a
# definer runs with its owner's rights: dlw_system bypasses RLS, dlw_login_manager may create
# roles). Adding one here is a security review decision.
_SYSTEM = "dlw_system"
_LOGIN_MANAGER = "dlw_login_manager"
DEFINER_ALLOWLIST: dict[str, str] = {
    # identity lookups before a tenant is known (sql/60_identity.sql)
    "dlw.login_user(text,text,text,boolean,text,text)": _SYSTEM,
    "dlw.find_service_account(text,text)": _SYSTEM,
    "dlw.resolve_tenant(text)": _SYSTEM,
    # platform administration by a system_admin (sql/71_platform_tenants.sql)
    "dlw.platform_create_tenant(text,text,integer,bigint,integer)": _SYSTEM,
    "dlw.platform_update_tenant(bigint,integer,bigint,integer,boolean,text)": _SYSTEM,
    # executors: claims and reports across tenants, scoped by the executor's context
    # (sql/41_executor_claim.sql, sql/42_executor_reports.sql)
    "dlw.executor_claim(integer,integer,text,integer)": _SYSTEM,
    # the cross-tenant storage-root registry, checked on every target write (sql/19_storage_roots.sql)
    "dlw.storage_root_sync(bigint,uuid)": _SYSTEM,
    # the storage counter, folded by admission for its own tenant (sql/23_stored_blobs.sql)
    "dlw.storage_usage_fold(bigint)": _SYSTEM,
    "dlw.executor_heartbeat(uuid,uuid,bigint,bigint,text)": _SYSTEM,
    "dlw.executor_complete(uuid,uuid,bigint,text,text)": _SYSTEM,
    "dlw.executor_fail(uuid,uuid,text,boolean,integer,integer)": _SYSTEM,
    "dlw.executor_release(uuid,uuid,bigint,text)": _SYSTEM,
    "dlw.executor_report_batch(jsonb,jsonb)": _SYSTEM,
    # deleting a task's files: the API's request (the context's tenant only) and the executors'
    # claim and reports, scoped like the file claim (sql/44_executor_deletions.sql)
    "dlw.delete_task(uuid)": _SYSTEM,
    "dlw.executor_claim_deletions(integer,integer,text,integer)": _SYSTEM,
    "dlw.executor_deletion_heartbeat(uuid,uuid)": _SYSTEM,
    "dlw.executor_deletion_complete(uuid,uuid)": _SYSTEM,
    "dlw.executor_deletion_fail(uuid,uuid,text,boolean,integer)": _SYSTEM,
    # every writer of task_files records its queue changes (statement trigger; sql/39_executor_queue.sql)
    "dlw.task_files_queue_changed()": _SYSTEM,
    # the usage fold and its drift check read every tenant's usage (sql/50_snapshots.sql)
    "dlw.refresh_quota_snapshots()": _SYSTEM,
    "dlw.quota_drift()": _SYSTEM,
    # the reporting watchdog signals reporting logins' backends, run by the fold (sql/50_snapshots.sql)
    "dlw.cancel_overlong_reporting_queries()": _SYSTEM,
    # reporting: when the usage fold last ran, without granting the platform table (sql/80_reporting_refreshed_at.sql)
    "dlw.reporting_snapshot_refreshed_at()": _SYSTEM,
    # /metrics: queue, leases and snapshot age across tenants, as counts only (sql/95_platform_metrics.sql)
    "dlw.platform_metrics(integer)": _SYSTEM,
    # repeats on the audit trail: dlw_app may not update audit rows (sql/91_dlw_admin_helpers.sql)
    "dlw.audit_repeat(text,text,jsonb)": _SYSTEM,
    # login roles (CREATEROLE), callable by dlw_system only (sql/90_login_roles.sql)
    "dlw.create_login_role(text,text)": _LOGIN_MANAGER,
    "dlw.set_login_role_password(text,text)": _LOGIN_MANAGER,
    "dlw.drop_login_role(text)": _LOGIN_MANAGER,
    "dlw.set_login_role_limits(text,integer,integer,integer,integer)": _LOGIN_MANAGER,
    # DBA administration for members of dlw_admin, each call audited (sql/92_… to sql/94_…)
    "dlw_admin.create_tenant(text,text,integer,bigint,integer)": _SYSTEM,
    "dlw_admin.rename_tenant(text,text,text)": _SYSTEM,
    "dlw_admin.deactivate_tenant(text,text)": _SYSTEM,
    "dlw_admin.reactivate_tenant(text)": _SYSTEM,
    "dlw_admin.set_quota(text,integer,bigint,integer)": _SYSTEM,
    "dlw_admin.list_tenants()": _SYSTEM,
    "dlw_admin.create_reporting_login(text,text,text)": _SYSTEM,
    "dlw_admin.set_reporting_login_password(text,text)": _SYSTEM,
    "dlw_admin.set_reporting_login_limits(text,integer,interval,interval,bigint,interval)": _SYSTEM,
    "dlw_admin.drop_reporting_login(text)": _SYSTEM,
    "dlw_admin.list_reporting_logins(text)": _SYSTEM,
    "dlw_admin.list_users(text)": _SYSTEM,
    "dlw_admin.grant_role(text,text,text)": _SYSTEM,
    "dlw_admin.revoke_role(text,text,text)": _SYSTEM,
    "dlw_admin.view_as_tenant(text,anyelement)": _SYSTEM,
    "dlw_admin.refresh_quota_snapshots()": _SYSTEM,
    "dlw_admin.quota_drift()": _SYSTEM,
}

# The advisory-lock functions of pg_catalog (every variant), and the only grants of them a DLW
# database keeps (dlw.secure_database(), sql/05_database.sql): the snapshot leader's try-lock and
# the pool's reset (unlock_all: own locks only) for dlw_app, the refresh's transaction try-lock for
# dlw_system. Anyone else who may take an
# advisory lock can take the platform's (leader, migrate, refresh) and stop it.
ADVISORY_LOCK_GRANTS: tuple[tuple[str, str], ...] = (
    ("pg_try_advisory_lock(bigint)", "dlw_app"),
    ("pg_advisory_unlock_all()", "dlw_app"),
    ("pg_try_advisory_xact_lock(bigint)", "dlw_system"),
    # the storage-target limit trigger (sql/20_tenants.sql), run by whoever inserts a target
    ("pg_advisory_xact_lock(bigint)", "dlw_app"),
    ("pg_advisory_xact_lock(bigint)", "dlw_system"),
)
_ADVISORY_FUNCTIONS = """
        SELECT p.oid::regprocedure::text
        FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ '^pg_(try_)?advisory_'"""

# Indexes of tenant tables that do not lead with tenant_id, each with why it may exist. Any other
# such index lets a query under row-level security fetch another tenant's row through the index
# before the policy's filter drops it, which EXPLAIN ANALYZE shows ("Rows Removed by Filter: 1"
# for another tenant's id, nothing for a missing one). Adding one here is a security review
# decision: no role under RLS may be able to use it ahead of the policy.
INDEX_ALLOWLIST: dict[str, str] = {
    "dlw.task_files_id_cross_tenant": "the executor reports find a file by id across tenants (dlw_system);"
    " on dlw.cross_tenant_key, which is not leakproof, so never used under RLS (migrations/0009)",
    "dlw.tenants_slug_cross_tenant": "slugs are unique across the platform, looked up by dlw_system;"
    " on dlw.cross_tenant_key, which is not leakproof, so never used under RLS (migrations/0009)",
    "dlw.users_identity": "one OIDC identity belongs to one tenant; dlw.login_user (dlw_system) finds a"
    " returning user by it before a tenant is known; reporting logins cannot read dlw.users",
    "dlw.reporting_logins_login_key": "one login maps to one tenant; dlw.reporting_tenant_id() finds the"
    " login's row by it, and the reporting policy (login = current_user) is a condition on this same"
    " column, so a probe for another login never reaches its row",
    "dlw.task_files_lease_expiry": "the expiry sweep of a system-wide claim (dlw_system) reads expired"
    " leases across tenants; on dlw.cross_tenant_key, which is not leakproof, so never used under RLS"
    " (migrations/0016)",
    "dlw.executor_queue_rank": "the fair claim (dlw_system) ranks tenants by files in flight across"
    " tenants; every key on dlw.cross_tenant_key, which is not leakproof, so never used under RLS"
    " (migrations/0016)",
    "dlw.task_deletions_lease_expiry": "the expiry sweep of a system-wide deletion claim (dlw_system) reads"
    " expired deletion leases across tenants; on dlw.cross_tenant_key, never used under RLS (migrations/0027)",
    "dlw.task_deletions_id_cross_tenant": "the deletion reports find a deletion by id across tenants"
    " (dlw_system); on dlw.cross_tenant_key, never used under RLS (migrations/0027)",
    "dlw.usage_records_xid": "the usage fold (dlw.refresh_quota_snapshots, dlw_system) reads every"
    " tenant's new events by xid range; xid is not granted to reporting logins, which cannot name it",
}

# The tenant tables (every table in schema dlw with a tenant_id column), and the non-extension
# SECURITY DEFINER functions: each check below adds one condition to one of these.
_TENANT_TABLES = """
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'dlw' AND c.relkind IN ('r', 'p')
          AND EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)"""
_DEFINER_FUNCTIONS = """
        SELECT p.oid::regprocedure::text
        FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"""

CHECKS: dict[str, str] = {
    "tenant table without RLS enabled and forced": _TENANT_TABLES
    + """
          AND NOT (c.relrowsecurity AND c.relforcerowsecurity)
        ORDER BY 1""",
    "tenant table without a policy for dlw_app": _TENANT_TABLES
    + """
          AND NOT EXISTS (SELECT 1 FROM pg_policy p
                          WHERE p.polrelid = c.oid
                            AND (SELECT oid FROM pg_roles WHERE rolname = 'dlw_app') = ANY (p.polroles))
        ORDER BY 1""",
    "SECURITY DEFINER function not on the allowlist": _DEFINER_FUNCTIONS
    + """
          AND NOT (p.oid::regprocedure::text = ANY (%(allowlist)s))
        ORDER BY 1""",
    "SECURITY DEFINER function owned by an unexpected role": """
        SELECT format('%%s (owner %%s, expected %%s)', a.signature, pg_get_userbyid(p.proowner), a.owner)
        FROM pg_proc p
        JOIN unnest(%(signatures)s::text[], %(owners)s::text[]) AS a(signature, owner)
          ON a.signature = p.oid::regprocedure::text
        WHERE p.prosecdef AND pg_get_userbyid(p.proowner) <> a.owner
        ORDER BY 1""",
    "SECURITY DEFINER function without a pinned search_path": _DEFINER_FUNCTIONS
    + """
          AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS cfg WHERE cfg LIKE 'search_path=%')
        ORDER BY 1""",
    "SECURITY DEFINER function executable by PUBLIC": _DEFINER_FUNCTIONS
    + """
          AND has_function_privilege('public', p.oid, 'EXECUTE')
        ORDER BY 1""",
    "advisory-lock function executable by PUBLIC": _ADVISORY_FUNCTIONS
    + """
          AND has_function_privilege('public', p.oid, 'EXECUTE')
        ORDER BY 1""",
    "advisory-lock function executable by a role other than the platform's": """
        SELECT format('%%s (%%s)', p.oid::regprocedure, r.rolname)
        FROM pg_proc p CROSS JOIN pg_roles r
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ '^pg_(try_)?advisory_'
          AND NOT r.rolsuper
          AND NOT has_function_privilege('public', p.oid, 'EXECUTE')
          AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
          AND (p.oid::regprocedure::text, r.rolname::text) NOT IN
              (SELECT * FROM unnest(%(lock_functions)s::text[], %(lock_roles)s::text[]))
        ORDER BY 1""",
    "index on a tenant table not led by tenant_id": """
        SELECT format('%%I.%%I', n.nspname, ic.relname)
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'dlw' AND c.relkind IN ('r', 'p')
          AND EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
          AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum = i.indkey[0] AND a.attname = 'tenant_id')
          AND NOT (format('%%I.%%I', n.nspname, ic.relname) = ANY (%(index_allowlist)s))
        ORDER BY 1""",
    "cross-tenant index key that RLS would not hold back (leakproof, inlinable or executable by dlw_reporting)": """
        SELECT p.oid::regprocedure::text
        FROM pg_proc p
        WHERE p.pronamespace = 'dlw'::regnamespace AND p.proname = 'cross_tenant_key'
          AND (p.proleakproof
               OR p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'plpgsql')
               OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_reporting')
                   AND has_function_privilege('dlw_reporting', p.oid, 'EXECUTE')))
        ORDER BY 1""",
    "dlw_app is a superuser or bypasses RLS": """
        SELECT rolname FROM pg_roles
        WHERE rolname = 'dlw_app' AND (rolsuper OR rolbypassrls)""",
    "dlw_app is missing": """
        SELECT 'dlw_app' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_app')""",
    "view readable by dlw_reporting without security_invoker": """
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'v'
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_reporting')
          AND has_table_privilege('dlw_reporting', c.oid, 'SELECT')
          AND NOT EXISTS (SELECT 1 FROM pg_options_to_table(c.reloptions) o
                          WHERE o.option_name = 'security_invoker'
                            AND lower(o.option_value) IN ('true', 'on', 'yes', '1'))
        ORDER BY 1""",
    # The limits of dlw.reporting_logins (migrations/0013) must be on the role itself: its
    # CONNECTION LIMIT and its role defaults for all databases (and no per-database override of
    # them, which would win). A login may ALTER ROLE itself SET a timeout; this reports it.
    "reporting login without its connection limit or role defaults": """
        SELECT format('%s: %s', r.login, concat_ws(', ',
                   CASE WHEN ro.rolconnlimit <> r.connection_limit
                        THEN format('connection limit %s (expected %s)', ro.rolconnlimit, r.connection_limit) END,
                   CASE WHEN m.missing IS NOT NULL THEN 'missing ' || array_to_string(m.missing, ' ') END,
                   CASE WHEN o.overridden THEN 'overridden for a database' END))
        FROM dlw.reporting_logins r
        JOIN pg_roles ro ON ro.rolname = r.login
        CROSS JOIN LATERAL (
            SELECT array_agg(w ORDER BY w) FILTER (WHERE NOT w = ANY (coalesce(s.setconfig, '{}'))) AS missing
            FROM unnest(ARRAY[format('statement_timeout=%s', r.statement_timeout_ms),
                              format('idle_in_transaction_session_timeout=%s', r.idle_in_transaction_timeout_ms),
                              format('temp_file_limit=%s', r.temp_file_limit_kb)]) AS w
            LEFT JOIN pg_db_role_setting s ON s.setrole = ro.oid AND s.setdatabase = 0) m
        CROSS JOIN LATERAL (
            SELECT EXISTS (SELECT 1 FROM pg_db_role_setting d, unnest(d.setconfig) AS c
                           WHERE d.setrole = ro.oid AND d.setdatabase <> 0
                             AND split_part(c, '=', 1) IN ('statement_timeout', 'idle_in_transaction_session_timeout',
                                                           'temp_file_limit')) AS overridden) o
        WHERE NOT ro.rolsuper
          AND (ro.rolconnlimit <> r.connection_limit OR m.missing IS NOT NULL OR o.overridden)
        ORDER BY 1""",
    # The transaction-age limit (migrations/0014) has no role setting on PostgreSQL 15/16: only the
    # watchdog run with every usage fold (about once a minute) holds it. A reporting transaction
    # older than its limit plus a grace for the watchdog's period means the watchdog is not
    # running (no pg_cron job and no API leader) or cannot signal.
    "reporting transaction older than its login's limit (is the watchdog running?)": """
        SELECT format('%%s (pid %%s): transaction open %%s s, limit %%s s', a.usename, a.pid,
                      round(extract(epoch FROM clock_timestamp() - a.xact_start)), r.transaction_timeout_ms / 1000)
        FROM pg_stat_activity a
        JOIN dlw.reporting_logins r ON r.login = a.usename
        WHERE a.backend_type = 'client backend' AND a.datname = current_database() AND a.xact_start IS NOT NULL
          AND clock_timestamp() - a.xact_start
              > r.transaction_timeout_ms * interval '1 millisecond' + %(watchdog_grace_s)s * interval '1 second'
        ORDER BY 1""",
    "reporting watchdog cannot see or signal reporting backends": """
        SELECT format('dlw_system lacks %s', g) FROM unnest(ARRAY['pg_read_all_stats', 'pg_signal_backend']) AS g
        WHERE NOT pg_has_role('dlw_system', g, 'USAGE')
        ORDER BY 1""",
    "materialized view readable by dlw_reporting (cannot carry RLS)": """
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'm'
          AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_reporting')
          AND has_table_privilege('dlw_reporting', c.oid, 'SELECT')
        ORDER BY 1""",
}


# How late the watchdog may be before a reporting transaction over its age limit is a problem:
# two periods of the per-minute usage fold that runs it.
WATCHDOG_GRACE_S = 120


def check_catalog(url: str, *, watchdog_grace_s: float = WATCHDOG_GRACE_S) -> list[str]:
    """Return one readable line per problem found; an empty list means the catalog is sound."""
    signatures = sorted(DEFINER_ALLOWLIST)
    params = {
        "allowlist": signatures,
        "signatures": signatures,
        "owners": [DEFINER_ALLOWLIST[name] for name in signatures],
        "lock_functions": [function for function, _ in ADVISORY_LOCK_GRANTS],
        "lock_roles": [role for _, role in ADVISORY_LOCK_GRANTS],
        "index_allowlist": sorted(INDEX_ALLOWLIST),
        "watchdog_grace_s": watchdog_grace_s,
    }
    problems: list[str] = []
    with psycopg.connect(url) as conn:
        for title, query in CHECKS.items():
            # Only queries with placeholders take parameters (the others use % literally).
            rows = conn.execute(query, params if "%(" in query else None).fetchall()  # type: ignore[arg-type]
            problems.extend(f"{title}: {row[0]}" for row in rows)
    return problems

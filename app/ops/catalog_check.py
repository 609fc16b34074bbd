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
    "dlw.login_user(text,text,text,text,text)": _SYSTEM,
    "dlw.find_service_account(text,text)": _SYSTEM,
    "dlw.resolve_tenant(text)": _SYSTEM,
    # platform administration by a system_admin (sql/71_platform_tenants.sql)
    "dlw.platform_create_tenant(text,text,integer,bigint,integer)": _SYSTEM,
    "dlw.platform_update_tenant(bigint,integer,bigint,integer,boolean,text)": _SYSTEM,
    # executors: claims and reports across tenants, scoped by the executor's context
    # (sql/41_executor_claim.sql, sql/42_executor_reports.sql)
    "dlw.executor_claim(integer,integer,text,integer)": _SYSTEM,
    "dlw.executor_heartbeat(uuid,uuid,bigint)": _SYSTEM,
    "dlw.executor_complete(uuid,uuid,bigint,text)": _SYSTEM,
    "dlw.executor_fail(uuid,uuid,text,boolean,integer)": _SYSTEM,
    "dlw.executor_release(uuid,uuid)": _SYSTEM,
    # the usage fold and its drift check read every tenant's usage (sql/50_snapshots.sql)
    "dlw.refresh_quota_snapshots()": _SYSTEM,
    "dlw.quota_drift()": _SYSTEM,
    # reporting: when the usage fold last ran, without granting the platform table (sql/80_reporting_refreshed_at.sql)
    "dlw.reporting_snapshot_refreshed_at()": _SYSTEM,
    # repeats on the audit trail: dlw_app may not update audit rows (sql/91_dlw_admin_helpers.sql)
    "dlw.audit_repeat(text,text,jsonb)": _SYSTEM,
    # login roles (CREATEROLE), callable by dlw_system only (sql/90_login_roles.sql)
    "dlw.create_login_role(text,text)": _LOGIN_MANAGER,
    "dlw.set_login_role_password(text,text)": _LOGIN_MANAGER,
    "dlw.drop_login_role(text)": _LOGIN_MANAGER,
    # DBA administration for members of dlw_admin, each call audited (sql/92_… to sql/94_…)
    "dlw_admin.create_tenant(text,text,integer,bigint,integer)": _SYSTEM,
    "dlw_admin.rename_tenant(text,text,text)": _SYSTEM,
    "dlw_admin.deactivate_tenant(text,text)": _SYSTEM,
    "dlw_admin.reactivate_tenant(text)": _SYSTEM,
    "dlw_admin.set_quota(text,integer,bigint,integer)": _SYSTEM,
    "dlw_admin.list_tenants()": _SYSTEM,
    "dlw_admin.create_reporting_login(text,text,text)": _SYSTEM,
    "dlw_admin.set_reporting_login_password(text,text)": _SYSTEM,
    "dlw_admin.drop_reporting_login(text)": _SYSTEM,
    "dlw_admin.list_reporting_logins(text)": _SYSTEM,
    "dlw_admin.list_users(text)": _SYSTEM,
    "dlw_admin.grant_role(text,text,text)": _SYSTEM,
    "dlw_admin.revoke_role(text,text,text)": _SYSTEM,
    "dlw_admin.view_as_tenant(text,anyelement)": _SYSTEM,
    "dlw_admin.refresh_quota_snapshots()": _SYSTEM,
    "dlw_admin.quota_drift()": _SYSTEM,
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
    "materialized view readable by dlw_reporting (cannot carry RLS)": """
        SELECT format('%I.%I', n.nspname, c.relname)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'm'
          AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_reporting')
          AND has_table_privilege('dlw_reporting', c.oid, 'SELECT')
        ORDER BY 1""",
}


def check_catalog(url: str) -> list[str]:
    """Return one readable line per problem found; an empty list means the catalog is sound."""
    signatures = sorted(DEFINER_ALLOWLIST)
    params = {
        "allowlist": signatures,
        "signatures": signatures,
        "owners": [DEFINER_ALLOWLIST[name] for name in signatures],
    }
    problems: list[str] = []
    with psycopg.connect(url) as conn:
        for title, query in CHECKS.items():
            # Only queries with placeholders take parameters (the others use % literally).
            rows = conn.execute(query, params if "%(" in query else None).fetchall()  # type: ignore[arg-type]
            problems.extend(f"{title}: {row[0]}" for row in rows)
    return problems

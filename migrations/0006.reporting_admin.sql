-- Direct SQL access: the `reporting` schema (security_invoker views for BI logins, in
-- sql/80_reporting.sql) and the `dlw_admin` schema (SECURITY DEFINER functions for DBAs, in
-- sql/90_dlw_admin.sql), plus the one role that may create and drop reporting logins.
--
-- Why a separate role for logins. Creating, altering and dropping login roles needs
-- CREATEROLE. Giving it to dlw_system would put CREATEROLE and BYPASSRLS in one role, which
-- owns many definer functions; on PostgreSQL 16 a CREATEROLE role may even create roles with
-- the attributes it holds itself (BYPASSRLS). Instead, dlw_login_manager has CREATEROLE and
-- nothing else (no LOGIN, no BYPASSRLS, NOINHERIT, owns no tables) and owns exactly three
-- small SECURITY DEFINER functions (dlw.create_login_role, dlw.set_login_role_password,
-- dlw.drop_login_role) that only dlw_system may call, from the dlw_admin functions.
--   PostgreSQL 15: CREATEROLE may create, alter and drop any non-superuser role and grant
--     membership in any non-superuser role (including dlw_system and predefined roles such as
--     pg_execute_server_program): whoever can run arbitrary SQL as dlw_login_manager is close
--     to a superuser. Nobody can: it cannot log in, has no members, and its functions take
--     only a validated, quoted role name and a password.
--   PostgreSQL 16: CREATEROLE may only administer roles on which it holds ADMIN OPTION: the
--     roles it created itself (granted automatically) and dlw_reporting (granted below, so
--     that it can make new logins members of dlw_reporting). It cannot touch dlw_app,
--     dlw_owner, dlw_system, dlw_admin or any other role.
-- Cluster-wide like the roles of 0001: creating a CREATEROLE role needs a superuser the
-- first time; later runs (other databases of the cluster) only check.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dlw_login_manager') THEN
        BEGIN
            CREATE ROLE dlw_login_manager NOLOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE NOCREATEDB NOREPLICATION NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database's migration created it a moment ago
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_auth_members m
                   WHERE m.roleid = 'dlw_reporting'::regrole AND m.member = 'dlw_login_manager'::regrole
                     AND m.admin_option) THEN
        GRANT dlw_reporting TO dlw_login_manager WITH ADMIN OPTION;
    END IF;
END
$roles$;
COMMENT ON ROLE dlw_login_manager IS
    'DLW: CREATEROLE only; owns dlw.create_login_role / set_login_role_password / drop_login_role (called by dlw_admin functions via dlw_system). NOLOGIN, no members.';

-- Only the owner creates objects in a DLW database. Large objects are the one kind every role
-- may create by default (they live in no schema, so REVOKE CREATE does not cover them): a
-- reporting login could otherwise fill pg_largeobject. No DLW role uses them.
REVOKE EXECUTE ON FUNCTION pg_catalog.lo_creat(integer), pg_catalog.lo_create(oid),
    pg_catalog.lo_from_bytea(oid, bytea), pg_catalog.lo_import(text), pg_catalog.lo_import(text, oid) FROM PUBLIC;

SET ROLE dlw_owner;

CREATE SCHEMA IF NOT EXISTS reporting AUTHORIZATION dlw_owner;
COMMENT ON SCHEMA reporting IS
    'Read-only views for BI tools and analysts (members of dlw_reporting); security_invoker, so row-level security shows each login only its own tenant';
REVOKE ALL ON SCHEMA reporting FROM PUBLIC;
GRANT USAGE ON SCHEMA reporting TO dlw_reporting, dlw_system;
-- DBAs name view row types (e.g. NULL::reporting.tasks) in dlw_admin.view_as_tenant; they get
-- no SELECT on the views and no policy, so they read nothing here directly.
GRANT USAGE ON SCHEMA reporting TO dlw_admin;

CREATE SCHEMA IF NOT EXISTS dlw_admin AUTHORIZATION dlw_owner;
COMMENT ON SCHEMA dlw_admin IS
    'Administration functions for DBAs (members of the dlw_admin role, no superuser needed): SECURITY DEFINER, owned by dlw_system, every call audited';
REVOKE ALL ON SCHEMA dlw_admin FROM PUBLIC;
GRANT USAGE ON SCHEMA dlw_admin TO dlw_admin;
GRANT USAGE, CREATE ON SCHEMA dlw_admin TO dlw_system;  -- owns the functions

-- The login manager owns its three functions in schema dlw and reads nothing else.
GRANT USAGE, CREATE ON SCHEMA dlw TO dlw_login_manager;

-- Whether dlw_admin.create_reporting_login created the role: only such roles are dropped
-- (or have their password changed) by the dlw_admin functions; a mapping a superuser made
-- for an existing role leaves that role alone.
ALTER TABLE dlw.reporting_logins ADD COLUMN IF NOT EXISTS managed_role boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN dlw.reporting_logins.managed_role IS
    'true: dlw_admin.create_reporting_login created the database role, and dlw_admin.drop_reporting_login drops it; false: the role was made elsewhere and is kept';
COMMENT ON COLUMN dlw.reporting_logins.login IS 'Database role name of the reporting login (unique in the cluster)';

RESET ROLE;

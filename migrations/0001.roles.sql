-- Cluster-wide roles shared by every DLW database in the cluster.
-- Creation tolerates a concurrent migration of another database creating the same role.
-- Creating BYPASSRLS roles needs a superuser the first time; later runs only check.

DO $roles$
DECLARE
    spec record;
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES
            ('dlw_owner',     'NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB'),
            ('dlw_app',       'LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOINHERIT'),
            ('dlw_system',    'NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEROLE NOCREATEDB'),
            ('dlw_reporting', 'NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB'),
            ('dlw_admin',     'NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB')
        ) AS r(name, attrs)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = spec.name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I %s', spec.name, spec.attrs);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it a moment ago
            END;
        END IF;
    END LOOP;
END
$roles$;

-- The owner role creates this database's schemas; nothing else gets CREATE on the database.
DO $grant$
BEGIN
    EXECUTE format('GRANT CREATE, CONNECT, TEMPORARY ON DATABASE %I TO dlw_owner', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO dlw_app, dlw_reporting, dlw_admin', current_database());
    EXECUTE format('REVOKE CREATE ON SCHEMA public FROM PUBLIC');
END
$grant$;

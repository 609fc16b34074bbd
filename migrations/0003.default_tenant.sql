-- The default tenant (id 1) with the default limits, its default project and default
-- storage target. Idempotent; runs as the migrating superuser, which RLS does not restrict.
INSERT INTO dlw.tenants (tenant_id, slug, display_name)
VALUES (1, 'default', 'Default tenant')
ON CONFLICT (tenant_id) DO NOTHING;
DO $$
BEGIN
    -- Explicit ids do not advance the identity sequence; make the next tenant id 2 or above.
    PERFORM setval(pg_get_serial_sequence('dlw.tenants', 'tenant_id'),
                   greatest((SELECT max(tenant_id) FROM dlw.tenants), 1));
END
$$;
INSERT INTO dlw.projects (tenant_id, name, is_default)
VALUES (1, 'default', true)
ON CONFLICT DO NOTHING;
INSERT INTO dlw.storage_targets (tenant_id, name)
VALUES (1, 'default')
ON CONFLICT DO NOTHING;

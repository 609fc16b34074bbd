-- owner: dlw_system
-- /metrics (app/api/metrics.py): the platform's state in one cheap query across tenants. It reads
-- only the unfinished files, through the partial index task_files_tenant_unfinished, so its cost
-- follows the queue, not the history; the API runs it at most once per DLW_METRICS_CACHE_SECONDS.
-- Tenant labels are opt-in and capped by the caller (p_tenant_labels, 0 = none): the busiest
-- tenants by queue length get their slug, every other tenant is folded into one unlabelled row,
-- so the number of series stays bounded whatever the number of tenants.

CREATE OR REPLACE FUNCTION dlw.platform_metrics(p_tenant_labels integer DEFAULT 0)
RETURNS TABLE (metric text, tenant text, state text, value double precision)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH unfinished AS (
        SELECT f.tenant_id, f.status::text AS status,
               f.status IN ('assigned', 'running') AND f.lease_expires_at < clock_timestamp() AS expired
          FROM dlw.task_files f
         WHERE f.status IN ('pending', 'assigned', 'running')
    ), labelled AS (
        SELECT u.tenant_id, t.slug
          FROM unfinished u JOIN dlw.tenants t ON t.tenant_id = u.tenant_id
         GROUP BY u.tenant_id, t.slug
         ORDER BY count(*) DESC, t.slug
         LIMIT greatest(coalesce(p_tenant_labels, 0), 0)
    )
    SELECT 'queue_files', l.slug, u.status, count(*)::float8
      FROM unfinished u LEFT JOIN labelled l ON l.tenant_id = u.tenant_id
     GROUP BY l.slug, u.status
    UNION ALL
    SELECT 'leases', NULL, CASE WHEN u.expired THEN 'expired' ELSE 'live' END, count(*)::float8
      FROM unfinished u
     WHERE u.status <> 'pending'
     GROUP BY 3
    UNION ALL
    SELECT 'lease_expiries', NULL, NULL, CASE WHEN s.is_called THEN s.last_value ELSE 0 END::float8
      FROM dlw.lease_expiries s
    UNION ALL
    SELECT 'snapshot_age_seconds', NULL, s.runner,
           extract(epoch FROM clock_timestamp() - s.refreshed_at)::float8
      FROM dlw.snapshot_state s
$$;
COMMENT ON FUNCTION dlw.platform_metrics(integer) IS
    'Rows for /metrics: queue_files (unfinished files by state; the p_tenant_labels busiest tenants by slug, the rest with tenant NULL), leases (assigned/running files: live or expired awaiting the sweep), lease_expiries (cumulative, dlw.lease_expiries) and snapshot_age_seconds (state = runner; NULL value = never refreshed).';
REVOKE ALL ON FUNCTION dlw.platform_metrics(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.platform_metrics(integer) TO dlw_app;

-- owner: dlw_system
-- The executor queue summary (dlw.executor_queue, migrations/0016): per tenant, files pending
-- and in flight, so the fair claim (sql/41_executor_claim.sql) ranks tenants by reading as many
-- summary rows as it returns files, whatever the number of tenants or of leases in flight.
--
-- Every statement that changes dlw.task_files appends, per tenant it touched, one change row
-- (folded = false: the differences of the two counts) through the statement triggers below. The
-- triggers are SECURITY DEFINER (dlw_system): whoever writes files (dlw_app under RLS, the
-- executor functions, the owner) records the change, and nobody writes the summary otherwise.
-- Appending never waits for anyone: two claims, or a claim and a task creation, never queue
-- behind each other's summary row.
--
-- dlw.executor_queue_fold() moves the changes into the tenants' summary rows. The claim runs it
-- (when no other claim is folding: a try-lock, so it never waits), and so does the per-minute
-- snapshot refresher, so the change rows stay few even without claims. A claim that could not
-- fold ranks on a summary a few transactions old: it may serve a tenant slightly out of turn,
-- never a file twice (files are still locked with SKIP LOCKED), and the next fold is exact.
-- Its cost follows the changes since the last fold, through the partial index
-- executor_queue_changes.

CREATE OR REPLACE FUNCTION dlw.task_files_queue_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One row per tenant whose counts moved; a heartbeat (running -> running) appends nothing.
    -- The transition tables exist only for the operations that have them (plpgsql plans each
    -- branch when it first runs it).
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dlw.executor_queue (tenant_id, folded, pending, in_flight)
        SELECT d.tenant_id, false, d.pending, d.in_flight
          FROM (SELECT n.tenant_id, count(*) FILTER (WHERE n.status = 'pending') AS pending,
                       count(*) FILTER (WHERE n.status IN ('assigned', 'running')) AS in_flight
                  FROM new_rows n GROUP BY n.tenant_id) d
         WHERE d.pending <> 0 OR d.in_flight <> 0;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO dlw.executor_queue (tenant_id, folded, pending, in_flight, served_at)
        SELECT d.tenant_id, false, d.pending, d.in_flight, CASE WHEN d.in_flight > 0 THEN clock_timestamp() END
          FROM (SELECT c.tenant_id, sum(c.pending) AS pending, sum(c.in_flight) AS in_flight
                  FROM (SELECT n.tenant_id, (n.status = 'pending')::integer AS pending,
                               (n.status IN ('assigned', 'running'))::integer AS in_flight
                          FROM new_rows n
                        UNION ALL
                        SELECT o.tenant_id, -(o.status = 'pending')::integer,
                               -(o.status IN ('assigned', 'running'))::integer
                          FROM old_rows o) c
                 GROUP BY c.tenant_id) d
         WHERE d.pending <> 0 OR d.in_flight <> 0;
    ELSE
        INSERT INTO dlw.executor_queue (tenant_id, folded, pending, in_flight)
        SELECT d.tenant_id, false, -d.pending, -d.in_flight
          FROM (SELECT o.tenant_id, count(*) FILTER (WHERE o.status = 'pending') AS pending,
                       count(*) FILTER (WHERE o.status IN ('assigned', 'running')) AS in_flight
                  FROM old_rows o GROUP BY o.tenant_id) d
         WHERE d.pending <> 0 OR d.in_flight <> 0;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION dlw.task_files_queue_changed() IS
    'Statement trigger of dlw.task_files (insert, update, delete; transition tables new_rows/old_rows): appends one change row to dlw.executor_queue per tenant whose pending or in-flight count moved (served_at set when files entered flight). Definer (dlw_system) so every writer records its changes; nobody needs EXECUTE.';

-- The triggers themselves are created by the table's owner (sql/40_executor_helpers.sql).

CREATE OR REPLACE FUNCTION dlw.executor_queue_fold() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_changes bigint;
BEGIN
    -- The caller holds the fold lock (dlw.executor_queue_try_fold). Each change row is deleted
    -- by exactly one fold and its differences added once; the summary rows are written in
    -- tenant order.
    WITH changes AS (
        DELETE FROM dlw.executor_queue q WHERE NOT q.folded
        RETURNING q.tenant_id, q.pending, q.in_flight, q.served_at
    ), sums AS (
        SELECT c.tenant_id, sum(c.pending)::bigint AS pending, sum(c.in_flight)::bigint AS in_flight,
               max(c.served_at) AS served_at, count(*) AS n
          FROM changes c GROUP BY c.tenant_id
    ), written AS (
        INSERT INTO dlw.executor_queue AS q (tenant_id, folded, pending, in_flight, served_at)
        SELECT s.tenant_id, true, s.pending, s.in_flight, s.served_at FROM sums s ORDER BY s.tenant_id
        ON CONFLICT (tenant_id) WHERE folded DO UPDATE
           SET pending = q.pending + excluded.pending, in_flight = q.in_flight + excluded.in_flight,
               served_at = greatest(q.served_at, excluded.served_at)
    )
    SELECT coalesce(sum(s.n), 0) INTO v_changes FROM sums s;  -- (a data-modifying CTE always runs)
    RETURN v_changes;
END
$$;
COMMENT ON FUNCTION dlw.executor_queue_fold() IS
    'Internal (dlw_system, under the fold lock): folds the change rows of dlw.executor_queue into the tenants'' summary rows (pending, in_flight added, served_at the latest). Returns how many change rows it folded. Cost follows the changes since the last fold.';

CREATE OR REPLACE FUNCTION dlw.executor_queue_try_fold() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One folder at a time, and nobody waits for it: the others use the summary as it is.
    -- Key "dlwqueue" (transaction-scoped: held until the caller's transaction ends).
    IF NOT pg_try_advisory_xact_lock(28266757947823461) THEN
        RETURN NULL;
    END IF;
    RETURN dlw.executor_queue_fold();
END
$$;
COMMENT ON FUNCTION dlw.executor_queue_try_fold() IS
    'Internal (dlw_system): folds the executor queue changes unless another transaction is folding (pg_try_advisory_xact_lock 28266757947823461; never waits). Returns the change rows folded, NULL when another fold held the lock. Run by every claim and every snapshot refresh.';

CREATE OR REPLACE FUNCTION dlw.executor_queue_rebuild() RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenants bigint;
BEGIN
    -- For data written with the triggers off (session_replication_role = replica: bulk loads,
    -- restores): recount everything from dlw.task_files. Waits for the fold lock.
    PERFORM pg_advisory_xact_lock(28266757947823461);
    LOCK TABLE dlw.task_files IN SHARE MODE;  -- no file changes state while it counts
    DELETE FROM dlw.executor_queue;
    INSERT INTO dlw.executor_queue (tenant_id, folded, pending, in_flight)
    SELECT f.tenant_id, true, count(*) FILTER (WHERE f.status = 'pending'),
           count(*) FILTER (WHERE f.status IN ('assigned', 'running'))
      FROM dlw.task_files f
     WHERE f.status IN ('pending', 'assigned', 'running')
     GROUP BY f.tenant_id;
    GET DIAGNOSTICS v_tenants = ROW_COUNT;
    RETURN v_tenants;
END
$$;
COMMENT ON FUNCTION dlw.executor_queue_rebuild() IS
    'Recounts dlw.executor_queue from dlw.task_files (a full scan, under a SHARE lock of task_files): for data loaded with triggers off (session_replication_role = replica). Superusers only. Returns how many tenants have unfinished files.';

REVOKE ALL ON FUNCTION dlw.task_files_queue_changed(), dlw.executor_queue_fold(), dlw.executor_queue_try_fold(),
    dlw.executor_queue_rebuild() FROM PUBLIC;
-- Creating a trigger needs EXECUTE on its function: the table's owner creates them.
GRANT EXECUTE ON FUNCTION dlw.task_files_queue_changed() TO dlw_owner;

-- owner: dlw_system
-- Usage snapshots: fold the append-only usage log into quota_snapshots, incrementally.
--
-- The cursor is dlw.snapshot_state.folded_below, a transaction id (xid8): every usage row whose
-- inserting transaction is below it is included in quota_snapshots.amount, none at or above it.
-- A run folds the rows with folded_below <= xid < H and moves the cursor to H, where H is the
-- xmin of a snapshot taken at the start of the run: every transaction below H had finished by
-- then, so no row below H can still appear later. A bigserial or timestamp watermark has no
-- such horizon: a transaction that took its number early and commits late lands behind the
-- watermark and is never counted. Here a long transaction merely holds the cursor back until
-- it ends (its rows and every later one are still counted exactly by dlw.bytes_used_month).
--
-- Cost follows the new events: the rows are found through usage_records_xid, a range scan of
-- the index over [folded_below, H); history below the cursor is never read.
--
-- Runs never overlap: a run takes a transaction-scoped advisory lock (key 28266757964587376,
-- "dlwsnap") and a second concurrent run returns at once, reporting ran = false. Only dlw_system
-- (this function's owner) and superusers may take advisory locks here (sql/05_database.sql), and
-- a caller's transaction may idle 10 s at most once it holds this one. The runner is
-- a pg_cron job (scheduled by `dlw migrate` where pg_cron is preloaded) or the API instance that
-- holds the leader lock (app/api/snapshot_leader.py); a DBA may also call it in psql.
--
-- Lock order (see sql/31_admission_check.sql, dlw.lock_tenant_quota_rows): quota_snapshots rows are updated or inserted in
-- ascending (tenant_id, period) order, each one before the next is touched, by one statement:
-- in the usual run (one month, every row there) one UPDATE over the primary key in the order of
-- the sorted tenant array (dlw.fold_add_to_existing_rows), otherwise one MERGE over the sorted
-- totals (or, when admission inserted a row after the MERGE's snapshot, the same write as
-- INSERT ... ON CONFLICT DO UPDATE); task admission inserts-or-locks its tenant's two rows the
-- same way in one statement, so no cycle of waits can form between them
-- (tests/sql/test_snapshot_lock_order.py, tests/sql/test_snapshot_single_pass.py). Per tenant
-- and month: one hash entry, one index descent and one HOT row version. What that costs, and
-- the designs measured against it: docs/fold-costs.md.


-- ---------------------------------------------------------------------------------------
-- The reporting watchdog, run with every fold (about once a minute; see the end of
-- dlw.refresh_quota_snapshots). A reporting login may SET statement_timeout and
-- idle_in_transaction_session_timeout (even ALTER ROLE itself SET them) to 0; the limits of its
-- row in dlw.reporting_logins hold anyway: statements running longer are cancelled
-- (pg_cancel_backend), sessions idle in a transaction for longer are terminated
-- (pg_terminate_backend), as the timeouts themselves would. Sessions whose transaction is older
-- than the login's transaction_timeout_ms are terminated too, however busy they keep it (a short
-- statement every second defeats both timeouts; PostgreSQL 15/16 have no setting for a
-- transaction's age, migrations/0014). dlw_system holds pg_read_all_stats
-- (to see those backends' state and times) and pg_signal_backend (migrations/0013); this
-- function signals only backends whose session user is a non-superuser reporting login mapped
-- in this database (in any database of the cluster, since the role is cluster-wide).
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.cancel_overlong_reporting_queries()
RETURNS TABLE (pid integer, login name, action text, elapsed interval, limit_ms integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v record;
BEGIN
    PERFORM pg_stat_clear_snapshot();  -- the backends as they are now, not as this transaction first saw them
    FOR v IN
        SELECT a.pid AS b_pid, a.usename AS b_login, a.state AS b_state,
               clock_timestamp() - a.query_start AS running, clock_timestamp() - a.state_change AS idle,
               clock_timestamp() - a.xact_start AS age,
               r.statement_timeout_ms AS stmt_ms, r.idle_in_transaction_timeout_ms AS idle_ms,
               r.transaction_timeout_ms AS xact_ms,
               clock_timestamp() - a.xact_start > r.transaction_timeout_ms * interval '1 millisecond' AS too_old
          FROM pg_stat_activity a
          JOIN dlw.reporting_logins r ON r.login = a.usename
          JOIN pg_roles ro ON ro.oid = a.usesysid
         WHERE a.backend_type = 'client backend'
           AND a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())  -- this database's mapping only
           AND a.pid <> pg_backend_pid()
           AND NOT ro.rolsuper
           AND pg_has_role(a.usesysid, 'dlw_reporting', 'MEMBER')
           AND ((a.xact_start IS NOT NULL
                 AND clock_timestamp() - a.xact_start > r.transaction_timeout_ms * interval '1 millisecond')
             OR (a.state IN ('active', 'fastpath function call')
                 AND clock_timestamp() - a.query_start > r.statement_timeout_ms * interval '1 millisecond')
             OR (a.state IN ('idle in transaction', 'idle in transaction (aborted)')
                 AND clock_timestamp() - a.state_change > r.idle_in_transaction_timeout_ms * interval '1 millisecond'))
         ORDER BY a.pid
    LOOP
        IF v.too_old THEN
            -- Only the end of the session ends a transaction that keeps busy.
            IF pg_terminate_backend(v.b_pid) THEN
                pid := v.b_pid; login := v.b_login; action := 'terminated'; elapsed := v.age; limit_ms := v.xact_ms;
                RETURN NEXT;
            END IF;
        ELSIF v.b_state IN ('active', 'fastpath function call') THEN
            IF pg_cancel_backend(v.b_pid) THEN
                pid := v.b_pid; login := v.b_login; action := 'cancelled'; elapsed := v.running;
                limit_ms := v.stmt_ms;
                RETURN NEXT;
            END IF;
        ELSIF pg_terminate_backend(v.b_pid) THEN
            pid := v.b_pid; login := v.b_login; action := 'terminated'; elapsed := v.idle; limit_ms := v.idle_ms;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION dlw.cancel_overlong_reporting_queries() IS
$c$The reporting watchdog: cancels (pg_cancel_backend) every statement of a reporting login that has run longer than its statement_timeout_ms, and terminates (pg_terminate_backend) every session of one idle in a transaction longer than its idle_in_transaction_timeout_ms or whose transaction is older than its transaction_timeout_ms, however busy (dlw.reporting_logins), whatever the login SET itself. Only backends of non-superuser members of dlw_reporting mapped in this database; never another role's. Returns one row per backend signalled (pid, login, action cancelled | terminated, elapsed: the statement's run time, the idle time or the transaction's age, limit_ms: the limit it exceeded).
Run by dlw.refresh_quota_snapshots(), i.e. about once a minute by the pg_cron job or the API leader; callable directly by dlw_system (and superusers).$c$;

-- The new events of a fold, [p_from, p_upto) through usage_records_xid, summed per (tenant,
-- UTC month, metric), with their count: the one definition of a fold's totals, inlined into
-- both statements of dlw.refresh_quota_snapshots that read them.
CREATE OR REPLACE FUNCTION dlw.fold_totals(p_from xid8, p_upto xid8)
RETURNS TABLE (t bigint, p date, m text, a bigint, n bigint)
LANGUAGE sql STABLE
AS $$
    SELECT u.tenant_id, dlw.month_start(u.occurred_at), u.metric, sum(u.amount)::bigint, count(*)
      FROM dlw.usage_records u
     WHERE u.xid >= p_from AND u.xid < p_upto
     GROUP BY 1, 2, 3
$$;
COMMENT ON FUNCTION dlw.fold_totals(xid8, xid8) IS
    'The usage events with p_from <= xid < p_upto summed per (tenant t, UTC month p, metric m): amount a and event count n. Read by dlw.refresh_quota_snapshots (inlined); callable by dlw_system only.';

-- ---------------------------------------------------------------------------------------
-- The fold's write when every total is for one month and one metric (step 3a of
-- dlw.refresh_quota_snapshots): adds p_amounts[i] to the existing row of p_tenants[i]
-- (ascending, distinct) for p_period and p_metric, in one UPDATE driven by the primary key
-- with tenant_id = ANY (p_tenants): the index scan takes the array's tenants in ascending order,
-- so the rows are updated (and locked) in ascending (tenant_id, period) order, each before the
-- next, as the MERGE does; no join, no per-row rescan. width_bucket() finds a row's position in
-- the sorted array by binary search ((SELECT p_tenants) hands it the array once, flat: PL/pgSQL
-- keeps arrays expanded, and width_bucket would flatten a copy for every row). The settings pin
-- that plan (a bitmap or sequential scan would take the rows in physical order) and plan once
-- for any array (a custom plan would estimate each element). Returns the rows updated: fewer
-- than the totals means a row was missing, and nothing may be kept (the caller rolls back).
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dlw.fold_add_to_existing_rows(
    p_tenants bigint[], p_amounts bigint[], p_period date, p_metric text
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_rows bigint;
BEGIN
    UPDATE dlw.quota_snapshots q
       SET amount = q.amount + p_amounts[width_bucket(q.tenant_id, (SELECT p_tenants))], refreshed_at = now()
     WHERE q.tenant_id = ANY (p_tenants) AND q.period = p_period AND q.metric = p_metric;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_rows;
END
$$;
COMMENT ON FUNCTION dlw.fold_add_to_existing_rows(bigint[], bigint[], date, text) IS
    'Step 3a of dlw.refresh_quota_snapshots: adds p_amounts[i] to the existing quota_snapshots row (p_tenants[i], p_period, p_metric) for every i, p_tenants ascending and distinct, in one UPDATE over the primary key in ascending tenant order (the fold''s lock order); returns the rows updated (fewer than the totals: a row was missing, the caller rolls back). Callable by dlw_system only.';

CREATE OR REPLACE FUNCTION dlw.refresh_quota_snapshots(
    OUT ran boolean,
    OUT events bigint,
    OUT tenants integer,
    OUT periods integer,
    OUT folded_from xid8,
    OUT folded_below xid8
)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The MERGE below joins the sorted new totals to quota_snapshots by an index nested loop: its
-- output (and so the lock order) follows the sorted input, and its cost the rows folded, not
-- the table (a hash join would read the whole table, in its physical order).
SET enable_hashjoin = off
SET enable_mergejoin = off
-- A few milliseconds of work: starting parallel workers would cost about as much.
SET max_parallel_workers_per_gather = 0
-- The totals grouped by sorting the new events (tenant, month, metric), not hashing them: the
-- groups then come out in tenant order, which the arrays need, so nothing is sorted twice and no
-- hash entry is built per tenant. At 10,000 tenants about a fifth of the fold's time less, at
-- 10 tenants (few groups, where hashing is cheap) about a tenth more (docs/fold-costs.md).
SET enable_hashagg = off
-- That sort holds all the run's new events: in memory up to several hundred thousand (a
-- catch-up after the runner stalled) rather than spilled to disk at the default 4 MB. One run
-- at a time (the advisory lock below), so this is one backend's memory.
SET work_mem = '64MB'
AS $$
DECLARE
    v_from     xid8;
    v_upto     xid8;
    v_tenant   bigint[];
    v_period   date[];
    v_metric   text[];
    v_amount   bigint[];
    v_first    date;
    v_last     date;
    v_metric1  text;
    v_metric2  text;
    v_written  boolean := false;
BEGIN
    ran := false; events := 0; tenants := 0; periods := 0;
    IF NOT pg_try_advisory_xact_lock(28266757964587376) THEN
        RETURN;  -- another run is in progress: it folds what this one would have
    END IF;
    -- The lock (and snapshot_state's row) is held until the caller's transaction ends. A caller
    -- that opened one (BEGIN; SELECT dlw_admin.refresh_quota_snapshots(); and then idles) would
    -- stop every later run, so that transaction may sit idle for 10 s at most from here on: the
    -- server then ends its session. A shorter limit the caller set is kept.
    IF (SELECT s.setting::integer NOT BETWEEN 1 AND 10000 FROM pg_settings s
         WHERE s.name = 'idle_in_transaction_session_timeout') THEN
        PERFORM set_config('idle_in_transaction_session_timeout', '10s', true);
    END IF;
    SELECT s.folded_below INTO v_from FROM dlw.snapshot_state s WHERE s.singleton FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dlw.snapshot_state has no row' USING ERRCODE = '55000';
    END IF;

    -- 1. The horizon, in its own statement: the xmin of the snapshot taken now. Every usage row
    --    below it belongs to a transaction that had finished by now, so the next statement
    --    (a later snapshot at READ COMMITTED, the same one at REPEATABLE READ) sees all of them.
    v_upto := greatest(pg_snapshot_xmin(pg_current_snapshot()), v_from);
    folded_from := v_from;
    folded_below := v_upto;

    -- 2. The new events per (tenant, UTC month, metric) through the xid index (dlw.fold_totals):
    --    the tenants ascending and their totals, the run's counts, its first and last month and
    --    metric: one sort of the new events, grouped in (tenant, month, metric) order. With one
    --    month and one metric there is one total per tenant (tenants = periods); otherwise step
    --    3b counts the tenants.
    SELECT array_agg(d.t ORDER BY d.t), array_agg(d.a ORDER BY d.t),
           coalesce(sum(d.n), 0), count(*), min(d.p), max(d.p), min(d.m), max(d.m)
      INTO v_tenant, v_amount, events, periods, v_first, v_last, v_metric1, v_metric2
      FROM dlw.fold_totals(v_from, v_upto) d;
    tenants := periods;

    -- 3. Every total added to its (tenant, month) row, or the row inserted, in ascending
    --    (tenant_id, period) order (lock order: sql/31_admission_check.sql).
    --    a. The usual run: one month and one metric (so one total per tenant), every row already there (admission
    --       creates a tenant's rows when it admits a task; a tenant's first fold of a month
    --       creates them otherwise). dlw.fold_add_to_existing_rows updates them in one pass of the
    --       primary key, in the order of the sorted tenant array, without a join: about half a
    --       microsecond less per tenant than the MERGE's nested loop (docs/fold-costs.md). If a
    --       row is missing (or admission inserted it after that statement's snapshot), fewer rows
    --       than totals were updated: the subtransaction is rolled back (row versions and locks
    --       released) and the MERGE below does the whole write, in order, inserting what is missing.
    IF periods > 0 AND v_first = v_last AND v_metric1 = v_metric2 THEN
        BEGIN
            IF dlw.fold_add_to_existing_rows(v_tenant, v_amount, v_first, v_metric1) < periods THEN
                RAISE EXCEPTION USING ERRCODE = 'no_data_found';
            END IF;
            v_written := true;
        EXCEPTION WHEN no_data_found THEN
            v_written := false;
        END;
    END IF;
    --    b. Otherwise (and after a.'s roll-back): the totals again, sorted by (tenant_id, period,
    --    metric) (a second read of the new events, in the runs that span two months or create
    --    rows), then MERGE over them (unnest and the nested loop keep the arrays' order). MERGE, not
    --    INSERT ... ON CONFLICT DO UPDATE: it finds each row once, through the join's index
    --    probe, and updates it (HOT: amount and refreshed_at are not indexed), where the upsert
    --    probes, locks, then updates and checks the row's constraints twice: about a fifth less
    --    per tenant (docs/fold-costs.md). A row task admission inserted after this statement's
    --    snapshot makes the MERGE's insert fail (unique_violation, after waiting for that
    --    transaction); the block then starts again as the upsert, which waits and adds.
    IF periods > 0 AND NOT v_written THEN
        SELECT array_agg(d.t ORDER BY d.t, d.p, d.m), array_agg(d.p ORDER BY d.t, d.p, d.m),
               array_agg(d.m ORDER BY d.t, d.p, d.m), array_agg(d.a ORDER BY d.t, d.p, d.m), count(DISTINCT d.t)
          INTO v_tenant, v_period, v_metric, v_amount, tenants
          FROM dlw.fold_totals(v_from, v_upto) d;
        BEGIN
            MERGE INTO dlw.quota_snapshots q
            USING unnest(v_tenant, v_period, v_metric, v_amount) AS d(t, p, m, a)
               ON q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
             WHEN MATCHED THEN
                  UPDATE SET amount = q.amount + d.a, refreshed_at = now()
             WHEN NOT MATCHED THEN
                  INSERT (tenant_id, period, metric, amount, refreshed_at) VALUES (d.t, d.p, d.m, d.a, now());
        EXCEPTION WHEN unique_violation THEN
            INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
            SELECT d.t, d.p, d.m, d.a, now() FROM unnest(v_tenant, v_period, v_metric, v_amount) AS d(t, p, m, a)
            ON CONFLICT (tenant_id, period, metric) DO UPDATE
               SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at;
        END;
    END IF;

    -- 4. The cursor moves in the same transaction: readers see the fold entirely or not at all.
    UPDATE dlw.snapshot_state s SET folded_below = v_upto, refreshed_at = now() WHERE s.singleton;
    ran := true;

    -- 5. The executor queue summary folds its changes here too (sql/39_executor_queue.sql), so
    --    they stay few even when no executor claims; skipped while a claim is folding.
    PERFORM dlw.executor_queue_try_fold();

    -- 6. The reporting watchdog rides on the per-minute runner (pg_cron job or API leader). Its
    --    failure must never cost the fold: it runs in a subtransaction and only warns.
    BEGIN
        PERFORM dlw.cancel_overlong_reporting_queries();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'reporting watchdog failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;
END
$$;
COMMENT ON FUNCTION dlw.refresh_quota_snapshots() IS
$c$Folds the usage events committed since the last run into quota_snapshots (per tenant, UTC month of occurred_at, metric) and advances dlw.snapshot_state.folded_below to the xmin of the run's snapshot, in one transaction. Incremental (reads only rows with folded_below <= xid < the new cursor, through usage_records_xid) and exact under out-of-order commits.
Returns (ran, events, tenants, periods, folded_from, folded_below). ran = false: another run held the lock (pg_try_advisory_xact_lock 28266757964587376) and nothing was done. After a run, the calling transaction may sit idle 10 s at most (idle_in_transaction_session_timeout, transaction-local), so nobody holds the lock by idling.
Called every minute by the pg_cron job or the API leader; safe to call by hand at any time and at any isolation level. Each run that takes the lock also runs the reporting watchdog, dlw.cancel_overlong_reporting_queries() (a failure there only warns).$c$;

CREATE OR REPLACE FUNCTION dlw.quota_drift()
RETURNS TABLE (
    tenant_id        bigint,
    period           date,
    metric           text,
    snapshot_amount  bigint,
    log_amount       bigint,
    difference       bigint
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    -- One statement, one snapshot: the cursor, the snapshots and the log are read consistently
    -- even while a refresh commits.
    WITH folded AS (
        SELECT u.tenant_id, dlw.month_start(u.occurred_at) AS period, u.metric, sum(u.amount)::bigint AS amount
          FROM dlw.usage_records u
         WHERE u.xid < (SELECT s.folded_below FROM dlw.snapshot_state s)
         GROUP BY 1, 2, 3
    )
    SELECT coalesce(q.tenant_id, f.tenant_id), coalesce(q.period, f.period), coalesce(q.metric, f.metric),
           coalesce(q.amount, 0), coalesce(f.amount, 0), coalesce(q.amount, 0) - coalesce(f.amount, 0)
      FROM dlw.quota_snapshots q
      FULL JOIN folded f ON f.tenant_id = q.tenant_id AND f.period = q.period AND f.metric = q.metric
     WHERE coalesce(q.amount, 0) <> coalesce(f.amount, 0)
     ORDER BY 1, 2, 3
$$;
COMMENT ON FUNCTION dlw.quota_drift() IS
    'Drift check: recomputes every (tenant, UTC month, metric) from the usage log below the fold cursor and returns the rows whose quota_snapshots.amount differs (difference = snapshot - log). No rows = the snapshots are exact. Reads the whole log (cost follows history): for DBAs and monitoring, not for the request path. Repairs nothing.';

REVOKE ALL ON FUNCTION dlw.refresh_quota_snapshots(), dlw.quota_drift(), dlw.cancel_overlong_reporting_queries(),
    dlw.fold_add_to_existing_rows(bigint[], bigint[], date, text), dlw.fold_totals(xid8, xid8) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dlw.refresh_quota_snapshots() TO dlw_app;
-- DBAs use the audited wrappers dlw_admin.refresh_quota_snapshots() and dlw_admin.quota_drift().

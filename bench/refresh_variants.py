"""Write steps of the usage fold side by side (docs/fold-costs.md, "Variants measured").

Loads 10,000 scale tenants (bench/scale_claims.py's load_queue, one pending and one assigned
file each), installs each variant as a copy of dlw.refresh_quota_snapshots() with a different
write step (`current` is the upsert the fold used before MERGE; `real` is the function itself),
and times every variant folding 10,000 events over 10 and over 10,000 tenants, rounds
alternating the variants and the sizes, in wall clock and in the backend's CPU time.

    .venv/bin/python -m bench.refresh_variants                        # every variant
    .venv/bin/python -m bench.refresh_variants --variants current real --rounds 15
    .venv/bin/python -m bench.refresh_variants --url URL ...          # an already loaded database
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import psycopg

from bench.refresh_cost import migrated_cluster
from bench.scale_claims import Queue, load_queue

AGG = """
    WITH new AS (
        SELECT u.tenant_id AS t, dlw.month_start(u.occurred_at) AS p, u.metric AS m,
               sum(u.amount)::bigint AS a, count(*) AS n
          FROM dlw.usage_records u
         WHERE u.xid >= v_from AND u.xid < v_upto
         GROUP BY 1, 2, 3
    )"""

# The fold's write before MERGE: every total, in key order, as an upsert.
UPSERT = """
        INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
        SELECT d.t, d.p, d.m, d.a, now() FROM new d
         ORDER BY d.t, d.p, d.m
        ON CONFLICT (tenant_id, period, metric) DO UPDATE
           SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at"""

VARIANTS = {
    "current": AGG
    + """, written AS (
"""
    + UPSERT
    + """
        RETURNING q.tenant_id
    )
    SELECT coalesce((SELECT sum(d.n) FROM new d), 0), (SELECT count(DISTINCT w.tenant_id) FROM written w),
           (SELECT count(*) FROM written w)
      INTO events, tenants, periods;""",
    "no_returning": AGG
    + """, written AS (
"""
    + UPSERT
    + """
    )
    SELECT coalesce(sum(d.n), 0), count(DISTINCT d.t), count(*) FROM new d
      INTO events, tenants, periods;""",
    "update_then_insert": AGG
    + """, upd AS (
        UPDATE dlw.quota_snapshots q SET amount = q.amount + d.a, refreshed_at = now()
          FROM (SELECT * FROM new ORDER BY t, p, m) d
         WHERE q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
        RETURNING q.tenant_id, q.period, q.metric
    ), ins AS (
        INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
        SELECT d.t, d.p, d.m, d.a, now() FROM new d
         WHERE NOT EXISTS (SELECT 1 FROM upd x WHERE x.tenant_id = d.t AND x.period = d.p AND x.metric = d.m)
         ORDER BY d.t, d.p, d.m
        ON CONFLICT (tenant_id, period, metric) DO UPDATE
           SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at
    )
    SELECT coalesce(sum(d.n), 0), count(DISTINCT d.t), count(*) FROM new d
      INTO events, tenants, periods;""",
    "probe_ctid": "--settings:enable_hashjoin = off,enable_mergejoin = off\n"
    + AGG
    + """, probe AS (
        SELECT d.t, d.p, d.m, d.a, d.n, q.ctid AS at
          FROM (SELECT * FROM new ORDER BY t, p, m) d
          LEFT JOIN dlw.quota_snapshots q ON q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
    ), ins AS (
        INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
        SELECT d.t, d.p, d.m, d.a, now() FROM probe d WHERE d.at IS NULL
        ON CONFLICT (tenant_id, period, metric) DO UPDATE
           SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at
        RETURNING 1
    ), upd AS (
        UPDATE dlw.quota_snapshots q SET amount = q.amount + d.a, refreshed_at = now()
          FROM probe d
         WHERE q.ctid = d.at AND (SELECT count(*) FROM ins) >= 0
        RETURNING 1
    )
    SELECT (SELECT sum(d.n) FROM probe d), (SELECT count(DISTINCT d.t) FROM probe d),
           (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)
      INTO events, tenants, periods;""",
    "update_nl": "--settings:enable_hashjoin = off,enable_mergejoin = off\n"
    + AGG
    + """, upd AS (
        UPDATE dlw.quota_snapshots q SET amount = q.amount + d.a, refreshed_at = now()
          FROM (SELECT * FROM new ORDER BY t, p, m) d
         WHERE q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
        RETURNING 1
    )
    SELECT (SELECT sum(d.n) FROM new d), (SELECT count(DISTINCT d.t) FROM new d), (SELECT count(*) FROM upd)
      INTO events, tenants, periods;""",
    "merge_guc": "--settings:enable_hashjoin = off,enable_mergejoin = off\n"
    + AGG.replace("WITH new AS (", "WITH new AS MATERIALIZED (")
    + """
    MERGE INTO dlw.quota_snapshots q
    USING (SELECT n.t, n.p, n.m, n.a FROM new n
           UNION ALL
           SELECT NULL, NULL, NULL, NULL
             FROM (SELECT set_config('dlw.fold_totals', coalesce(sum(n.n), 0) || ' ' || count(DISTINCT n.t), true) AS s
                     FROM new n) x
            WHERE x.s IS NULL
           ORDER BY 1, 2, 3) d
       ON q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
     WHEN MATCHED THEN UPDATE SET amount = q.amount + d.a, refreshed_at = now()
     WHEN NOT MATCHED THEN INSERT (tenant_id, period, metric, amount, refreshed_at) VALUES (d.t, d.p, d.m, d.a, now());
    GET DIAGNOSTICS periods = ROW_COUNT;
    events := split_part(current_setting('dlw.fold_totals'), ' ', 1)::bigint;
    tenants := split_part(current_setting('dlw.fold_totals'), ' ', 2)::integer;""",
    "merge_arrays": "--settings:enable_hashjoin = off,enable_mergejoin = off\n"
    + """
    SELECT array_agg(d.t), array_agg(d.p), array_agg(d.m), array_agg(d.a),
           coalesce(sum(d.n), 0), count(DISTINCT d.t), count(*)
      INTO v_t, v_p, v_m, v_a, events, tenants, periods
      FROM (SELECT u.tenant_id AS t, dlw.month_start(u.occurred_at) AS p, u.metric AS m,
                   sum(u.amount)::bigint AS a, count(*) AS n
              FROM dlw.usage_records u
             WHERE u.xid >= v_from AND u.xid < v_upto
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3) d;
    MERGE INTO dlw.quota_snapshots q
    USING unnest(v_t, v_p, v_m, v_a) AS d(t, p, m, a)
       ON q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
     WHEN MATCHED THEN UPDATE SET amount = q.amount + d.a, refreshed_at = now()
     WHEN NOT MATCHED THEN INSERT (tenant_id, period, metric, amount, refreshed_at)
          VALUES (d.t, d.p, d.m, d.a, now());""",
    "upd_ins": "--settings:enable_hashjoin = off,enable_mergejoin = off\n"
    + AGG
    + """, upd AS (
        UPDATE dlw.quota_snapshots q SET amount = q.amount + d.a, refreshed_at = now()
          FROM (SELECT * FROM new ORDER BY t, p, m) d
         WHERE q.tenant_id = d.t AND q.period = d.p AND q.metric = d.m
        RETURNING d.t, d.p, d.m, d.n
    ), ins AS (
        INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)
        SELECT d.t, d.p, d.m, d.a, now() FROM new d
         WHERE (SELECT count(*) FROM upd) < (SELECT count(*) FROM new)
           AND NOT EXISTS (SELECT 1 FROM upd x WHERE x.t = d.t AND x.p = d.p AND x.m = d.m)
         ORDER BY d.t, d.p, d.m
        ON CONFLICT (tenant_id, period, metric) DO UPDATE
           SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at
        RETURNING 1
    )
    SELECT (SELECT coalesce(sum(d.n), 0) FROM new d), (SELECT count(DISTINCT d.t) FROM new d),
           (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)
      INTO events, tenants, periods;""",
    "aggregate_only": AGG
    + """
    SELECT coalesce(sum(d.n), 0), count(DISTINCT d.t), count(*) FROM new d
      INTO events, tenants, periods;""",
}

TEMPLATE = """
CREATE OR REPLACE FUNCTION dlw.{name}(
    OUT ran boolean, OUT events bigint, OUT tenants integer, OUT periods integer,
    OUT folded_from xid8, OUT folded_below xid8)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp{settings}
AS $fn$
DECLARE
    v_t bigint[]; v_p date[]; v_m text[]; v_a bigint[];
    v_rows dlw.quota_snapshots[];
    v_from xid8;
    v_upto xid8;
BEGIN
    ran := false; events := 0; tenants := 0; periods := 0;
    IF NOT pg_try_advisory_xact_lock(28266757964587376) THEN
        RETURN;
    END IF;
    IF (SELECT s.setting::integer NOT BETWEEN 1 AND 10000 FROM pg_settings s
         WHERE s.name = 'idle_in_transaction_session_timeout') THEN
        PERFORM set_config('idle_in_transaction_session_timeout', '10s', true);
    END IF;
    SELECT s.folded_below INTO v_from FROM dlw.snapshot_state s WHERE s.singleton FOR UPDATE;
    v_upto := greatest(pg_snapshot_xmin(pg_current_snapshot()), v_from);
    folded_from := v_from;
    folded_below := v_upto;
    {step2}
    UPDATE dlw.snapshot_state s SET folded_below = v_upto, refreshed_at = now() WHERE s.singleton;
    ran := true;
    PERFORM dlw.executor_queue_try_fold();
    BEGIN
        PERFORM dlw.cancel_overlong_reporting_queries();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'reporting watchdog failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;
END
$fn$;
ALTER FUNCTION dlw.{name}() OWNER TO dlw_system;
"""

INSERT = (
    "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
    " SELECT t.tenant_id, 'bytes_month', 1, 'v:' || %(a)s || ':' || t.tenant_id || ':' || g"
    " FROM (SELECT tenant_id FROM dlw.tenants WHERE slug ~ '^s[0-9]+$' ORDER BY 1 LIMIT %(n)s) t,"
    " generate_series(1, 10000 / %(n)s) g"
)


def compare(url: str, variants: dict[str, str], tenants: int, rounds: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name, step2 in variants.items():
            if name == "real":
                continue
            settings = ""
            if step2.startswith("--settings:"):
                first, step2 = step2.split("\n", 1)
                settings = "".join(f"\nSET {kv}" for kv in first.removeprefix("--settings:").split(","))
            conn.execute(
                TEMPLATE.replace("{name}", "v_" + name).replace("{step2}", step2).replace("{settings}", settings)
            )  # type: ignore[call-overload]
        conn.execute("SELECT dlw.refresh_quota_snapshots()")  # whatever was left unfolded
        sizes = {"few": 10, "many": tenants}
        samples: dict[tuple[str, str], list[float]] = {(v, k): [] for v in variants for k in sizes}
        names = list(variants)
        pid = conn.info.backend_pid
        cpu: dict[tuple[str, str], list[float]] = {(v, k): [] for v in variants for k in sizes}

        def on_cpu() -> float:  # the backend's CPU time (ns), whatever else runs on the machine
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9

        stamp = time.time_ns()
        for i in range(rounds + 1):
            order = names[i % len(names) :] + names[: i % len(names)]
            for v in order:
                for key in ("few", "many") if i % 2 else ("many", "few"):
                    stamp += 1
                    conn.execute(INSERT, {"n": sizes[key], "a": stamp})
                    c0, t0 = on_cpu(), time.perf_counter()
                    fn = "refresh_quota_snapshots" if v == "real" else f"v_{v}"
                    row = conn.execute(f"SELECT events, tenants, periods FROM dlw.{fn}()").fetchone()
                    dt, dc = time.perf_counter() - t0, on_cpu() - c0
                    assert row is not None and row[0] == 10_000, row
                    if i >= 1:  # the first round creates the rows
                        samples[(v, key)].append(dt)
                        cpu[(v, key)].append(dc)
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        st = conn.execute(
            "SELECT pg_relation_size('dlw.quota_snapshots') / 8192, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
            " WHERE relid = 'dlw.quota_snapshots'::regclass"
        ).fetchone()
        print(f"quota_snapshots: {st[0]} pages, {st[1]:,} updates, {100 * st[2] / max(st[1], 1):.1f} % HOT")  # type: ignore[index]
        drift = conn.execute("SELECT count(*) FROM dlw.quota_drift()").fetchone()
        print(f"drift rows: {drift[0] if drift else '?'} (the aggregate_only variant writes nothing)")
    # The minimum too: on a shared machine it is the run least disturbed by other work.
    for title, data, stat in (
        ("wall clock, median", samples, statistics.median),
        ("backend CPU, median", cpu, statistics.median),
        ("backend CPU, minimum", cpu, min),
    ):
        print(f"\n{title} of {rounds}")
        print(f"{'variant':22} {'10 t ms':>9} {'many t ms':>10} {'ratio':>6} {'us/extra tenant':>16}")
        for v in variants:
            s = stat(data[(v, "few")]) * 1000
            g = stat(data[(v, "many")]) * 1000
            print(f"{v:22} {s:>9.2f} {g:>10.2f} {g / s:>6.2f} {(g - s) * 1000 / (tenants - 10):>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--url", help="an already loaded database (e.g. from a previous run)")
    parser.add_argument("--extra", nargs="*", default=[], help="name=file.sql of further step-2 bodies")
    args = parser.parse_args()
    variants = {k: VARIANTS.get(k, "") for k in args.variants}  # "real": dlw.refresh_quota_snapshots()
    for spec in args.extra:
        name, path = spec.split("=", 1)
        variants[name] = Path(path).read_text()
    if args.url:
        compare(args.url, variants, args.tenants, args.rounds)
        return
    with migrated_cluster("dlw-refresh-variants-", "v") as cluster:
        with psycopg.connect(cluster.url("v"), autocommit=True) as conn:
            load_queue(conn, Queue(tenants=args.tenants, pending=args.tenants, in_flight=args.tenants))
            conn.execute("VACUUM ANALYZE")
        compare(cluster.url("v"), variants, args.tenants, args.rounds)


if __name__ == "__main__":
    main()

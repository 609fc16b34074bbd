"""The refresh part of the scale bench (bench/scale.py): dlw.refresh_quota_snapshots() folding the
same number of new events spread over few and over many tenants, side by side, with the share of
quota_snapshots updates that were HOT and, above target, the plans of the fold's two statements.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from bench.scale_common import median_ms

REFRESH_MAX = 5.0


HOT = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'dlw.quota_snapshots'::regclass"

# `n` usage events numbered from `a`, event g going to the (g mod the set's size)-th tenant of
# the set (each set's tenants ascending), in one statement.
EVENTS = """
WITH t AS (SELECT x.tenant_id, x.i - 1 AS i FROM unnest(%(t)s::bigint[]) WITH ORDINALITY AS x(tenant_id, i))
INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)
SELECT t.tenant_id, 'bytes_month', 1, %(prefix)s || g
  FROM generate_series(%(a)s::bigint, %(a)s::bigint + %(n)s - 1) g
  JOIN t ON t.i = g %% cardinality(%(t)s::bigint[])"""

# The fold's two statements in a one-month run over existing rows (sql/50_snapshots.sql, steps 2
# and 3a) over the events not folded yet, with the settings the functions run them with. The
# tenants come through a subquery, a parameter of the plan as in the function's generic plan (and
# not 10,000 ids written into the listing).
FOLD_SETTINGS = ("max_parallel_workers_per_gather", "enable_hashagg", "enable_seqscan", "enable_bitmapscan")
AGGREGATE = """
SELECT array_agg(d.t ORDER BY d.t), array_agg(d.a ORDER BY d.t),
       coalesce(sum(d.n), 0), count(*), min(d.p), max(d.p), min(d.m), max(d.m)
  FROM dlw.fold_totals(%(from)s::xid8, '18446744073709551615'::xid8) d"""
UPDATE = """
UPDATE dlw.quota_snapshots q
   SET amount = q.amount + (%(a)s::bigint[])[width_bucket(q.tenant_id, (SELECT %(t)s::bigint[]))], refreshed_at = now()
 WHERE q.tenant_id = ANY ((SELECT %(t)s::bigint[])::bigint[]) AND q.period = %(p)s AND q.metric = %(m)s"""


def hot_updates(conn: psycopg.Connection) -> tuple[int, int]:
    """quota_snapshots' updates and HOT updates so far (this backend's counts flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(HOT).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def measure_refresh(
    conn: psycopg.Connection, few: int, many: int, events: int, reps: int, prefix: str = "r:"
) -> dict[str, Any]:
    """Rounds of: `events` new events over the first `few` tenants, fold; the same over the first
    `many`, fold (the order alternating). Each fold commits, as the per-minute runner's does.
    `prefix` starts the events' keys (unique per tenant): another one for each further call."""
    tenants = [r[0] for r in conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug ~ '^s[0-9]+$' ORDER BY 1")]
    sets = {"few": tenants[:few], "many": tenants[:many]}
    samples: dict[str, list[float]] = {"few": [], "many": []}
    start = 0
    upd0 = hot_updates(conn)
    for i in range(reps + 1):
        for key in ("few", "many") if i % 2 else ("many", "few"):
            conn.execute(EVENTS, {"t": sets[key], "a": start, "n": events, "prefix": prefix})
            start += events
            t0 = time.perf_counter()
            conn.execute("SELECT * FROM dlw.refresh_quota_snapshots()")
            if i >= 1:  # the first round creates the snapshot rows
                samples[key].append(time.perf_counter() - t0)
    upd1 = hot_updates(conn)
    s, g = median_ms(samples["few"]), median_ms(samples["many"])
    updates, hot = upd1[0] - upd0[0], upd1[1] - upd0[1]
    per_tenant_us = (g - s) * 1000 / (len(sets["many"]) - few)
    print(
        f"  refresh: {per_tenant_us:.1f} us per extra tenant; quota_snapshots updates {updates:,},"
        f" HOT {hot:,} ({100 * hot / max(updates, 1):.1f} %)"
    )
    return {
        "measure": f"refresh {events:,} events: {few} -> {len(sets['many']):,} tenants",
        "small_ms": s,
        "large_ms": g,
        "ratio": g / s,
        "target": REFRESH_MAX,
        "explain": lambda: explain_refresh(conn, sets, events),
    }


def explain_refresh(conn: psycopg.Connection, sets: dict[str, list[int]], events: int) -> str:
    """The fold's two statements written out over the same new events for each tenant set
    (rolled back): the totals through usage_records_xid into sorted arrays, then the single
    UPDATE of every tenant's row (dlw.fold_add_to_existing_rows). The difference between the
    two sets' plans is the per-tenant work."""
    out: list[str] = []
    for key in ("few", "many"):
        with conn.transaction(force_rollback=True):
            conn.execute(EVENTS, {"t": sets[key], "a": 1, "n": events, "prefix": "x:"})
            for name in FOLD_SETTINGS:
                conn.execute("SELECT set_config(%s, %s, true)", (name, "0" if name.startswith("max_") else "off"))
            cursor = conn.execute("SELECT folded_below::text FROM dlw.snapshot_state").fetchone()
            bounds = {"from": cursor[0] if cursor else "0"}  # a constant: fold_totals is inlined as in the fold
            totals = conn.execute(AGGREGATE, bounds).fetchone()
            assert totals is not None
            plans = [conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {AGGREGATE}", bounds).fetchall()]
            args = {"t": totals[0], "a": totals[1], "p": totals[4], "m": totals[6]}
            plans.append(conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {UPDATE}", args).fetchall())
        out.append(f"  {len(sets[key]):,} tenants:")
        for plan in plans:
            out.extend("    " + r[0] for r in plan)
    return "\n".join(out)


def main() -> None:
    """The refresh row alone, on the scale bench's large database loaded as bench/scale.py loads
    it (10,000 tenants, 1M pending and 1M assigned files, the history; --quick: 2,000 tenants),
    measured `--runs` times one after the other: `python -m bench.scale_refresh [--quick]`."""
    import argparse

    from bench.refresh_cost import migrated_cluster
    from bench.scale import load_history, print_rows
    from bench.scale_claims import Queue, load_queue

    parser = argparse.ArgumentParser(prog="python -m bench.scale_refresh", description=main.__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    large = Queue(2_000, 200_000, 200_000) if args.quick else Queue(10_000, 1_000_000, 1_000_000)
    with (
        migrated_cluster("dlw-bench-scale-refresh-", "scale_large") as cluster,
        psycopg.connect(cluster.url("scale_large"), autocommit=True) as conn,
    ):
        load_queue(conn, large)
        load_history(conn, 50_000 if args.quick else 200_000)
        conn.execute("VACUUM ANALYZE")
        for run in range(args.runs):
            row = measure_refresh(conn, 10, large.tenants, 10_000, 5 if args.quick else 9, f"r{run}:")
            print_rows("Snapshot refresh (median)", "10 tenants", f"{large.tenants:,} tenants", [row])


if __name__ == "__main__":
    main()

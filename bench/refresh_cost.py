"""Snapshot refresh cost against history: dlw.refresh_quota_snapshots() folding the same number of
new usage events (10,000 by default) on top of 100,000, 1,000,000 and (with --full) 10,000,000
events already folded.

The refresh reads only the rows above its cursor, through the xid index, so its time should stay
flat whatever the history; the drift check (dlw.quota_drift(), a full recompute from the log) is
timed alongside as the contrast: it grows with the history.

Each history size gets its own database on one embedded PostgreSQL (durability off). History is
generated in batches of 1M rows per transaction (INSERT ... SELECT generate_series, so each batch
has its own xid) and folded once; autovacuum's steady state is imitated with VACUUM ANALYZE. Then,
`repeats` times: 10,000 new events are inserted in 100 transactions of 100 (the way completions
arrive) and one refresh folds them, timed as the caller sees it.

    python -m bench.refresh_cost                  # 100k and 1M of history (about a minute)
    python -m bench.refresh_cost --full           # 100k, 1M and 10M (about 5 minutes more)
    python -m bench.refresh_cost --quick          # 10k and 100k (seconds)
    python -m bench.refresh_cost --history 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate
from bench.load import print_table_head

PG_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
}
QUICK_HISTORY = (10_000, 100_000)
DEFAULT_HISTORY = (100_000, 1_000_000)
FULL_HISTORY = (100_000, 1_000_000, 10_000_000)  # ~4 min more on 2 cores: --full or DLW_BENCH_REFRESH_FULL=1
TENANTS = 100
BATCH = 1_000_000
REFRESH = "SELECT ran, events FROM dlw.refresh_quota_snapshots()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def migrated_cluster(prefix: str, dbname: str) -> Iterator[LocalCluster]:
    """A throw-away PostgreSQL (PG_SETTINGS) with one migrated database `dbname`, destroyed after:
    what the standalone scale tools (bench.scale_refresh, bench.scale_grants,
    bench.refresh_variants) run on."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        cluster = LocalCluster(Path(tmp) / "pgdata", port=_free_port(), extra_settings=PG_SETTINGS)
        cluster.start()
        try:
            with psycopg.connect(cluster.url(), autocommit=True) as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            migrate(cluster.url(dbname))
            yield cluster
        finally:
            cluster.destroy()


def _insert_events(conn: psycopg.Connection, tenants: list[int], start: int, count: int, prefix: str) -> None:
    """count usage events spread over the tenants, in one statement (one transaction's xid). Ids
    and keys grow with i, as DLW's time-ordered ids (dlw.new_id()) and file:<id> keys do."""
    conn.execute(
        "INSERT INTO dlw.usage_records (tenant_id, id, metric, amount, event_key, occurred_at)"
        " SELECT (%(tenants)s::bigint[])[1 + i %% cardinality(%(tenants)s::bigint[])],"
        "        lpad(to_hex(i), 32, '0')::uuid,"
        "        'bytes_month', 1 + (i * 7919) %% 1000000, %(prefix)s || lpad(i::text, 12, '0'), now()"
        "   FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS i",
        {"tenants": tenants, "start": start, "stop": start + count - 1, "prefix": prefix},
    )


def _measure(url: str, history: int, new_events: int, repeats: int, log: bool) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        tenants = [
            int(conn.execute("SELECT dlw.provision_tenant(%s, %s, 0, 0, 0)", (f"bench-{i}", "bench")).fetchone()[0])  # type: ignore[index]
            for i in range(TENANTS)
        ]
        started = time.perf_counter()
        for start in range(0, history, BATCH):
            with conn.transaction():
                _insert_events(conn, tenants, start, min(BATCH, history - start), "h:")
            if log and history > BATCH:
                print(f"  history {history:,}: {start + BATCH:,} rows loaded", flush=True)
        first = time.perf_counter()
        row = conn.execute(REFRESH).fetchone()
        assert row is not None and row[0] and row[1] == history, row
        initial_fold_s = time.perf_counter() - first
        conn.execute("VACUUM ANALYZE dlw.usage_records")
        load_s = time.perf_counter() - started

        timings: list[float] = []
        next_id = history
        for _ in range(repeats):
            per_txn = max(new_events // 100, 1)
            for start in range(next_id, next_id + new_events, per_txn):
                with conn.transaction():
                    _insert_events(conn, tenants, start, min(per_txn, next_id + new_events - start), "n:")
            next_id += new_events
            t0 = time.perf_counter()
            row = conn.execute(REFRESH).fetchone()
            timings.append((time.perf_counter() - t0) * 1000)
            assert row is not None and row[0] and row[1] == new_events, row

        t0 = time.perf_counter()
        drift = conn.execute("SELECT count(*) FROM dlw.quota_drift()").fetchone()
        drift_ms = (time.perf_counter() - t0) * 1000
        assert drift is not None and drift[0] == 0, "the snapshots drifted from the log"
        size = conn.execute("SELECT pg_total_relation_size('dlw.usage_records')").fetchone()
    return {
        "history_events": history,
        "new_events": new_events,
        "refresh_ms_median": statistics.median(timings),
        "refresh_ms_min": min(timings),
        "refresh_ms_max": max(timings),
        "drift_check_ms": drift_ms,
        "initial_fold_s": initial_fold_s,
        "load_s": load_s,
        "usage_table_mb": (size[0] if size else 0) / 1e6,
    }


def run(
    quick: bool = False,
    full: bool | None = None,
    history: tuple[int, ...] | None = None,
    new_events: int = 10_000,
    repeats: int = 5,
) -> list[dict[str, Any]]:
    """Measure and print the table; returns one dict per history size (the first one is the
    baseline: ratio_vs_smallest = its median refresh time / the baseline's).

    History sizes: `history` if given; else 10k and 100k when quick; else 100k, 1M and (full, or
    DLW_BENCH_REFRESH_FULL=1) 10M; else 100k and 1M."""
    if full is None:
        full = os.environ.get("DLW_BENCH_REFRESH_FULL", "") not in ("", "0")
    sizes = history or (QUICK_HISTORY if quick else FULL_HISTORY if full else DEFAULT_HISTORY)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dlw-bench-refresh-") as tmp:
        cluster = LocalCluster(Path(tmp) / "pgdata", port=_free_port(), extra_settings=PG_SETTINGS)
        cluster.start()
        try:
            for size in sizes:
                name = f"dlw_refresh_{size}"
                with psycopg.connect(cluster.url(), autocommit=True) as admin:
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                migrate(cluster.url(name))
                print(f"history {size:,}: loading ...", flush=True)
                rows.append(_measure(cluster.url(name), size, new_events, repeats, log=True))
        finally:
            cluster.destroy()
    base = rows[0]["refresh_ms_median"]
    for row in rows:
        row["ratio_vs_smallest"] = row["refresh_ms_median"] / base if base else float("nan")
    print_table(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\nrefresh = dlw.refresh_quota_snapshots() folding the new events; drift = dlw.quota_drift() (full recompute)"
    )
    print_table_head(
        f"{'history':>11} {'new':>7} {'refresh p50 ms':>14} {'min':>7} {'max':>7} {'vs first':>8}"
        f" {'drift ms':>9} {'table MB':>9} {'load s':>7}"
    )
    for r in rows:
        print(
            f"{r['history_events']:>11,} {r['new_events']:>7,} {r['refresh_ms_median']:>14.1f}"
            f" {r['refresh_ms_min']:>7.1f} {r['refresh_ms_max']:>7.1f} {r['ratio_vs_smallest']:>7.2f}x"
            f" {r['drift_check_ms']:>9.0f} {r['usage_table_mb']:>9.0f} {r['load_s']:>7.0f}"
        )
    if len(rows) > 1:
        ratio = rows[-1]["ratio_vs_smallest"]
        growth = rows[-1]["history_events"] / rows[0]["history_events"]
        verdict = "flat" if ratio < 2 else "NOT flat"
        print(
            f"{growth:,.0f}x the history -> {ratio:.2f}x the refresh time: {verdict}"
            " (target: proportional to the new events, not to history)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k events of history")
    parser.add_argument("--full", action="store_true", help="add 10M events of history (several minutes)")
    parser.add_argument("--history", type=int, nargs="+", help="history sizes (default: 100000 1000000)")
    parser.add_argument("--new-events", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run(
        quick=args.quick,
        full=args.full or None,
        history=tuple(args.history) if args.history else None,
        new_events=args.new_events,
        repeats=args.repeats,
    )


if __name__ == "__main__":
    main()

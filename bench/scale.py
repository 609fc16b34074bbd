"""Costs that must stay flat as tenants and history grow (issue 16), each measured at a small and a
large size in one run, side by side, with its ratio to the smallest size and its target.

  claim       dlw.executor_claim of 1, 10, 100 files (system-wide executor, as dlw_app), at
              10 tenants / 10k pending / 10k in flight vs 10,000 / 1M / 1M (--quick: 2,000 /
              200k / 200k); target <= 2x
  admission   dlw.create_task and dlw.quota_current() for a tenant with 100 vs 100,000 usage rows
              this month (folded; a few not); target <= 1.5x
  lists       GET /tasks?status= and GET /audit?action= (the routes' SQL, as dlw_app under RLS) vs
              the unfiltered first page, at 200,000 tasks / audit rows of one tenant (--quick 50,000);
              target <= 1.5x
  refresh     dlw.refresh_quota_snapshots() folding 10,000 events spread over 10 vs 10,000 tenants
              (--quick 2,000); target <= 5x
  grants      bench/scale_grants.py: a grant change reaching an API instance at 10 vs 10,000 grants

Data is loaded as the other parts load it: INSERT ... SELECT generate_series as superuser, with
session_replication_role = replica (rows valid by construction), then the queue summary is
recounted (dlw.executor_queue_rebuild(), the triggers being off) and VACUUM ANALYZE. Every
measured call runs in a transaction that is rolled back, so the state is the same for every
repetition; repetitions alternate between the sizes. For a ratio above its target, the plan (or,
for statements inside a function, the rows each index and table gave in that call) is printed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from app.db.queries import SQL
from app.ops.embedded import LocalCluster
from app.ops.migrate import migrate
from bench.load import print_table_head
from bench.refresh_cost import PG_SETTINGS, _free_port

CLAIM_MAX = 2.0
USAGE_MAX = 1.5
LIST_MAX = 1.5
REFRESH_MAX = 5.0


@dataclass(frozen=True)
class Queue:
    tenants: int
    pending: int
    in_flight: int

    @property
    def label(self) -> str:
        return f"{self.tenants:,} t / {self.pending:,} p / {self.in_flight:,} f"


# Which rows of a transaction's statistics (pg_stat_xact_*) one call touched: how many rows each
# table and index gave. It explains a ratio for statements inside a function (no EXPLAIN there).
TOUCHED = """
SELECT c.relname, c.relkind,
       pg_stat_get_xact_numscans(c.oid) AS scans,
       pg_stat_get_xact_tuples_returned(c.oid) AS rows_read
  FROM pg_class c
 WHERE c.relnamespace = 'dlw'::regnamespace AND c.relkind IN ('r', 'i')
   AND (pg_stat_get_xact_numscans(c.oid) > 0 OR pg_stat_get_xact_tuples_returned(c.oid) > 0)
 ORDER BY rows_read DESC, c.relname"""


def touched(conn: psycopg.Connection) -> list[tuple[str, str, int, int]]:
    return [(r[0], "table" if r[1] == "r" else "index", int(r[2]), int(r[3])) for r in conn.execute(TOUCHED)]


def format_touched(rows: list[tuple[str, str, int, int]]) -> str:
    return "\n".join(
        f"    {kind:5} {name:36} scans {scans:>6}  rows read {read:>9,}" for name, kind, scans, read in rows
    )


def load_queue(conn: psycopg.Connection, q: Queue) -> None:
    """q.tenants tenants, each with one running task holding pending/tenants pending files and
    in_flight/tenants assigned ones (leases for an hour: nothing expires while measuring). The
    tasks are already running, so a claim starts none: what is measured is the fairness step,
    the sweep and the files' own work."""
    conn.execute(
        "SELECT count(dlw.provision_tenant(format('s%%s', g), 'scale', 0, 0, 0)) FROM generate_series(1, %s) g",
        (q.tenants,),
    )
    conn.execute("SET session_replication_role = replica")
    conn.execute("SET work_mem = '256MB'")
    conn.execute(
        """
        INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, status, file_count,
                               total_bytes, created_by)
        SELECT t.tenant_id, p.id, s.id, 'bench/scale', 'main', 'running', %(per)s, %(per)s, 'bench'
          FROM dlw.tenants t
          JOIN dlw.projects p ON p.tenant_id = t.tenant_id AND p.is_default
          JOIN dlw.storage_targets s ON s.tenant_id = t.tenant_id AND s.name = 'default'
         WHERE t.slug ~ '^s[0-9]+$'
        """,
        {"per": (q.pending + q.in_flight) // q.tenants},
    )
    conn.execute(
        """
        INSERT INTO dlw.task_files (tenant_id, task_id, path, size, status, attempts, assignment_token,
                                    lease_seconds, lease_expires_at, executor_id, created_at)
        SELECT x.tenant_id, x.id, 'f' || g, 1,
               CASE WHEN g <= %(pending)s THEN 'pending' ELSE 'assigned' END,
               CASE WHEN g <= %(pending)s THEN 0 ELSE 1 END,
               CASE WHEN g > %(pending)s THEN gen_random_uuid() END,
               CASE WHEN g > %(pending)s THEN 3600 END,
               CASE WHEN g > %(pending)s THEN now() + interval '1 hour' + g * interval '1 ms' END,
               CASE WHEN g > %(pending)s THEN 'bench' END,
               now() - interval '1 day' + g * interval '1 ms'
          FROM dlw.tasks x CROSS JOIN generate_series(1, %(pending)s + %(in_flight)s) g
         WHERE x.repo_id = 'bench/scale'
        """,
        {"pending": q.pending // q.tenants, "in_flight": q.in_flight // q.tenants},
    )
    conn.execute("RESET session_replication_role")
    conn.execute("SELECT dlw.executor_queue_rebuild()")


def load_history(conn: psycopg.Connection, rows: int) -> dict[str, int]:
    """The admission tenants (100 and 100,000 usage rows this month, folded, plus 5 not), and
    one list tenant with `rows` tasks and audit rows (1 % failed / task.failed, spread in time)."""
    ids: dict[str, int] = {}
    for name, count in (("usage-100", 100), ("usage-100k", 100_000)):
        row = conn.execute("SELECT dlw.provision_tenant(%s, 'scale', 0, %s, 0)", (name, 10**15)).fetchone()
        ids[name] = int(row[0])  # type: ignore[index]
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, occurred_at)"
            " SELECT %s, 'bytes_month', 1, 'h:' || g, now() - (g %% 1000) * interval '1 s'"
            " FROM generate_series(1, %s) g",
            (ids[name], count),
        )
    conn.execute("SELECT dlw.refresh_quota_snapshots()")
    for name in ("usage-100", "usage-100k"):
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
            " SELECT %s, 'bytes_month', 1, 'n:' || g FROM generate_series(1, 5) g",
            (ids[name],),
        )
    ids["lists"] = int(conn.execute("SELECT dlw.provision_tenant('lists', 'scale', 0, 0, 0)").fetchone()[0])  # type: ignore[index]
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        """
        INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, status, created_by,
                               created_at, updated_at)
        SELECT %(t)s, p.id, s.id, 'bench/list', 'main',
               CASE WHEN g %% 100 = 0 THEN 'failed' ELSE 'succeeded' END, 'bench',
               now() - g * interval '1 s', now() - g * interval '1 s'
          FROM dlw.projects p JOIN dlw.storage_targets s ON s.tenant_id = p.tenant_id AND s.name = 'default'
         CROSS JOIN generate_series(1, %(n)s) g
         WHERE p.tenant_id = %(t)s AND p.is_default
        """,
        {"t": ids["lists"], "n": rows},
    )
    conn.execute(
        "INSERT INTO dlw.audit_log (tenant_id, at, actor, action, target)"
        " SELECT %(t)s, now() - g * interval '1 s', 'bench',"
        "        CASE WHEN g %% 100 = 0 THEN 'task.failed' ELSE 'task.created' END, g::text"
        " FROM generate_series(1, %(n)s) g",
        {"t": ids["lists"], "n": rows},
    )
    conn.execute("RESET session_replication_role")
    return ids


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_in_rolled_back(
    conn: psycopg.Connection, context: tuple[int, str, str], query: str, args: tuple[Any, ...]
) -> float:
    """Seconds one call takes, inside BEGIN; set_context; ...; ROLLBACK (the state stays)."""
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT dlw.set_context(%s, %s, %s)", context)
        t0 = time.perf_counter()
        conn.execute(query, args).fetchall()
        return time.perf_counter() - t0


def explain_touched(conn: psycopg.Connection, context: tuple[int, str, str], query: str, args: tuple[Any, ...]) -> str:
    # The backend's pending counters may still hold earlier transactions' counts (they are
    # flushed about once a second): the difference around the one call is what it read.
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT dlw.set_context(%s, %s, %s)", context)
        before = {(name, kind): (scans, read) for name, kind, scans, read in touched(conn)}
        conn.execute(query, args).fetchall()
        after = touched(conn)
    rows = [
        (name, kind, scans - before.get((name, kind), (0, 0))[0], read - before.get((name, kind), (0, 0))[1])
        for name, kind, scans, read in after
    ]
    return format_touched(sorted((r for r in rows if r[2] or r[3]), key=lambda r: -r[3]))


CLAIM = "SELECT file_id FROM dlw.executor_claim(%s, 3600, 'bench')"
EXECUTOR = (0, "bench-executor", "executor")


def measure_claims(small: psycopg.Connection, large: psycopg.Connection, reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 10, 100):
        samples: dict[str, list[float]] = {"small": [], "large": []}
        for i in range(reps + 3):
            order = (("small", small), ("large", large)) if i % 2 else (("large", large), ("small", small))
            for key, conn in order:
                t = time_in_rolled_back(conn, EXECUTOR, CLAIM, (n,))
                if i >= 3:  # warm-up
                    samples[key].append(t)
        s, g = _median_ms(samples["small"]), _median_ms(samples["large"])
        rows.append({"measure": f"claim {n} file(s)", "small_ms": s, "large_ms": g, "ratio": g / s, "target": CLAIM_MAX,
                     "explain": lambda n=n: "  small:\n" + explain_touched(small, EXECUTOR, CLAIM, (n,))
                     + "\n  large:\n" + explain_touched(large, EXECUTOR, CLAIM, (n,))})  # fmt: skip
    return rows


FILES = [{"path": "model.safetensors", "size": 1000}]
CREATE = "SELECT outcome FROM dlw.create_task(NULL, 'default', 'org/m', 'main', 0, %s)"
QUOTA = "SELECT bytes_used_month FROM dlw.quota_current()"
USAGE_STATEMENT = (
    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT sum(u.amount) FROM dlw.usage_records u"
    " WHERE u.tenant_id = %s AND u.xid >= (SELECT folded_below FROM dlw.snapshot_state) AND u.metric = 'bytes_month'"
)


def measure_admission(conn: psycopg.Connection, ids: dict[str, int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for label, query, args in (("create task", CREATE, (Jsonb(FILES),)), ("GET /quota/current", QUOTA, ())):
        samples: dict[str, list[float]] = {"usage-100": [], "usage-100k": []}
        for i in range(reps + 3):
            for key in ("usage-100", "usage-100k") if i % 2 else ("usage-100k", "usage-100"):
                t = time_in_rolled_back(conn, (ids[key], "bench", "tenant_operator"), query, args)
                if i >= 3:
                    samples[key].append(t)
        s, g = _median_ms(samples["usage-100"]), _median_ms(samples["usage-100k"])

        def explain(query: str = query, args: tuple[Any, ...] = args) -> str:
            out = []
            for key in ("usage-100", "usage-100k"):
                ctx = (ids[key], "bench", "tenant_operator")
                out.append(f"  {key}, rows each relation gave:\n" + explain_touched(conn, ctx, query, args))
            return "\n".join(out)

        rows.append({"measure": f"{label} (usage rows 100 -> 100k)", "small_ms": s, "large_ms": g, "ratio": g / s,
                     "target": USAGE_MAX, "explain": explain})  # fmt: skip
    return rows


async def _lists(app_url: str, tenant: int, reps: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(app_url)
    try:
        shapes = {
            "tasks": (SQL["list_tasks"], (50,), SQL["list_tasks_by_status"], (50, "failed")),
            "audit": (
                SQL["audit_trail"],
                (None, None, 50),
                SQL["audit_trail_by_action"],
                (None, None, "task.failed", 50),
            ),
        }
        rows = []
        for name, (plain_q, plain_a, filt_q, filt_a) in shapes.items():
            plain, filtered = await conn.prepare(plain_q), await conn.prepare(filt_q)
            samples: dict[str, list[float]] = {"plain": [], "filtered": []}
            for i in range(reps + 10):
                for key, stmt, args in (("plain", plain, plain_a), ("filtered", filtered, filt_a))[
                    :: 1 if i % 2 else -1
                ]:
                    async with conn.transaction():
                        await conn.execute("SELECT dlw.set_context($1, 'bench', 'tenant_admin')", tenant)
                        t0 = time.perf_counter()
                        await stmt.fetch(*args)
                        if i >= 10:  # past the custom-plan executions: the generic plan is timed
                            samples[key].append(time.perf_counter() - t0)
            plans = []
            for key, q, args in (("unfiltered", plain_q, plain_a), ("filtered", filt_q, filt_a)):
                async with conn.transaction():
                    await conn.execute("SELECT dlw.set_context($1, 'bench', 'tenant_admin')", tenant)
                    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, FORMAT JSON) {q}", *args)
                    plans.append(f"  {key} (generic plan, as dlw_app):\n" + _plan_text(plan))
            s, g = _median_ms(samples["plain"]), _median_ms(samples["filtered"])
            label = "GET /tasks?status=failed" if name == "tasks" else "GET /audit?action=task.failed"
            rows.append({"measure": f"{label} vs unfiltered", "small_ms": s, "large_ms": g, "ratio": g / s,
                         "target": LIST_MAX, "explain": lambda plans=plans: "\n".join(plans)})  # fmt: skip
        return rows
    finally:
        await conn.close()


def _plan_text(plan: Any) -> str:
    node = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
    lines: list[str] = []

    def walk(n: dict[str, Any], depth: int) -> None:
        what = n["Node Type"] + (f" using {n['Index Name']}" if "Index Name" in n else "")
        cond = n.get("Index Cond") or n.get("Filter") or ""
        lines.append(f"    {'  ' * depth}{what}  rows={n.get('Actual Rows')}  {cond}"[:200])
        for child in n.get("Plans", []):
            walk(child, depth + 1)

    walk(node, 0)
    return "\n".join(lines)


HOT = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'dlw.quota_snapshots'::regclass"


def hot_updates(conn: psycopg.Connection) -> tuple[int, int]:
    """quota_snapshots' updates and HOT updates so far (this backend's counts flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(HOT).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def measure_refresh(conn: psycopg.Connection, few: int, many: int, events: int, reps: int) -> dict[str, Any]:
    tenants = [r[0] for r in conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug ~ '^s[0-9]+$' ORDER BY 1")]
    sets = {"few": tenants[:few], "many": tenants[:many]}
    samples: dict[str, list[float]] = {"few": [], "many": []}
    start = 0
    upd0 = hot_updates(conn)
    for i in range(reps + 1):
        for key in ("few", "many") if i % 2 else ("many", "few"):
            conn.execute(
                "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
                " SELECT (%(t)s::bigint[])[1 + g %% cardinality(%(t)s::bigint[])], 'bytes_month', 1, 'r:' || g"
                " FROM generate_series(%(a)s::bigint, %(b)s::bigint) g",
                {"t": sets[key], "a": start, "b": start + events - 1},
            )
            start += events
            t0 = time.perf_counter()
            conn.execute("SELECT * FROM dlw.refresh_quota_snapshots()")
            if i >= 1:  # the first round creates the snapshot rows
                samples[key].append(time.perf_counter() - t0)
    upd1 = hot_updates(conn)
    s, g = _median_ms(samples["few"]), _median_ms(samples["many"])
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
    """The fold's one statement (sql/50_snapshots.sql, step 2), written out over the same new
    events for each tenant set (rolled back): the aggregation through usage_records_xid, then the
    upsert of every (tenant, month). The difference between the two plans is the per-tenant work."""
    out: list[str] = []
    for key in ("few", "many"):
        with conn.transaction(force_rollback=True):
            conn.execute(
                "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key)"
                " SELECT (%(t)s::bigint[])[1 + g %% cardinality(%(t)s::bigint[])], 'bytes_month', 1, 'x:' || g"
                " FROM generate_series(1, %(n)s) g",
                {"t": sets[key], "n": events},
            )
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)"
                " WITH new AS (SELECT u.tenant_id AS t, dlw.month_start(u.occurred_at) AS p, u.metric AS m,"
                "                     sum(u.amount)::bigint AS a, count(*) AS n"
                "                FROM dlw.usage_records u"
                "               WHERE u.xid >= (SELECT folded_below FROM dlw.snapshot_state) GROUP BY 1, 2, 3),"
                " written AS (INSERT INTO dlw.quota_snapshots AS q (tenant_id, period, metric, amount, refreshed_at)"
                "             SELECT d.t, d.p, d.m, d.a, now() FROM new d ORDER BY d.t, d.p, d.m"
                "             ON CONFLICT (tenant_id, period, metric) DO UPDATE"
                "                SET amount = q.amount + excluded.amount, refreshed_at = excluded.refreshed_at"
                "             RETURNING q.tenant_id)"
                " SELECT (SELECT sum(d.n) FROM new d), (SELECT count(*) FROM written w)"
            ).fetchall()
        out.append(f"  {len(sets[key]):,} tenants:")
        out.extend("    " + r[0] for r in plan)
    return "\n".join(out)


def print_rows(title: str, small: str, large: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print_table_head(f"{'measure':44} {small:>24} {large:>26} {'ratio':>6} {'target':>7}  result")
    for r in rows:
        met = r["ratio"] <= r["target"]
        r["met"] = met
        print(
            f"{r['measure']:44} {r['small_ms']:>21.3f} ms {r['large_ms']:>23.3f} ms {r['ratio']:>6.2f}"
            f" {'<= ' + format(r['target'], 'g'):>7}  {'met' if met else 'MISSED'}"
        )
    for r in rows:
        if not r["met"]:
            print(f"\n{r['measure']}: {r['ratio']:.2f}x > {r['target']:g}x; what it read:\n{r['explain']()}")


def run(quick: bool = False) -> list[dict[str, Any]]:
    small_q = Queue(10, 10_000, 10_000)
    large_q = Queue(2_000, 200_000, 200_000) if quick else Queue(10_000, 1_000_000, 1_000_000)
    list_rows = 50_000 if quick else 200_000
    reps = 15 if quick else 40
    password = secrets.token_urlsafe(12)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dlw-bench-scale-") as tmp:
        cluster = LocalCluster(Path(tmp) / "pgdata", port=_free_port(), extra_settings=PG_SETTINGS)
        cluster.start()
        try:
            urls = {}
            for name, q in (("scale_small", small_q), ("scale_large", large_q)):
                with psycopg.connect(cluster.url(), autocommit=True) as admin:
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                migrate(cluster.url(name))
                t0 = time.perf_counter()
                with psycopg.connect(cluster.url(name), autocommit=True) as conn:
                    conn.execute(sql.SQL("ALTER ROLE dlw_app PASSWORD {}").format(sql.Literal(password)))
                    load_queue(conn, q)
                    ids = load_history(conn, list_rows) if name == "scale_large" else {}
                    conn.execute("VACUUM ANALYZE")
                print(f"{name}: {q.label} loaded in {time.perf_counter() - t0:.0f} s", flush=True)
                urls[name] = cluster.url(name, user="dlw_app", password=password)
            with psycopg.connect(urls["scale_small"]) as small, psycopg.connect(urls["scale_large"]) as large:
                claims = measure_claims(small, large, reps)
                print_rows("Executor claim (system-wide, median)", small_q.label, large_q.label, claims)
                admission = measure_admission(large, ids, reps)
                print_rows(
                    "Admission and quota reads (one tenant, median)", "100 usage rows", "100,000 usage rows", admission
                )
            lists = asyncio.run(_lists(urls["scale_large"], ids["lists"], reps))
            print_rows(f"Filtered lists at {list_rows:,} rows of one tenant (median)", "unfiltered page",
                       "filtered page", lists)  # fmt: skip
            with psycopg.connect(cluster.url("scale_large"), autocommit=True) as conn:
                refresh = [measure_refresh(conn, 10, large_q.tenants, 10_000, 5 if quick else 9)]
                print_rows("Snapshot refresh (median)", "10 tenants", f"{large_q.tenants:,} tenants", refresh)
            results = claims + admission + lists + refresh
            from bench import scale_grants

            results += scale_grants.run(cluster.url("scale_small"), urls["scale_small"], quick=quick)
        finally:
            cluster.destroy()
    return [{k: v for k, v in r.items() if k != "explain"} for r in results]


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in the shape of bench/__main__.py's summary (measure, ratio, target, met)."""
    return [
        {"measure": r["measure"][:44], "ratio": r["ratio"], "target": f"<= {r['target']:g}", "met": r["met"]}
        for r in rows
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)

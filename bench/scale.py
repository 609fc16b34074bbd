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
import tempfile
import time
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
from bench.scale_claims import Queue, load_queue, measure_claims
from bench.scale_common import explain_touched, median_ms, time_in_rolled_back
from bench.scale_refresh import measure_refresh

USAGE_MAX = 1.5
LIST_MAX = 1.5


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
        s, g = median_ms(samples["usage-100"]), median_ms(samples["usage-100k"])

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
            s, g = median_ms(samples["plain"]), median_ms(samples["filtered"])
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

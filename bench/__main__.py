"""`python -m bench [--quick] [--only create|list|notify|refresh|executor|scale]` (or `./run bench`): the
DESIGN.md §6
performance targets, measured in one run on an embedded PostgreSQL, printed as tables of ratios.
See bench/README.md for what each part measures and how to read the output."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.load import print_table_head

PARTS = ("create", "list", "notify", "refresh", "executor", "scale")
CREATE_MIN_VS_BARE = 0.8
CREATE_MIN_VS_PGBENCH = 0.3
LIST_MAX_OVERHEAD = 1.10


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_header(bench: Any, quick: bool) -> None:
    from bench.cluster import PG_SETTINGS
    from bench.servers import POOL_MAX, POOL_MIN

    http = "httptools" if importlib.util.find_spec("httptools") else "h11 (pure Python; httptools not installed)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio (uvloop not installed)"
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}")
    print(
        f"postgres: {bench.server_version()} embedded (pgserver), "
        + ", ".join(f"{k}={v}" for k, v in PG_SETTINGS.items())
        + "  <- durability OFF: CPU and locking are measured, not the disk"
    )
    print(f"api servers: uvicorn, 1 worker, log level info, {http}, {loop}; asyncpg pool {POOL_MIN}..{POOL_MAX}")
    print(f"mode: {'--quick (smoke run: short cells, small data)' if quick else 'default'}")
    print(f"load average at start: {_loadavg()}  (other work on this machine disturbs every number below)")
    print(flush=True)


# ------------------------------------------------------------------------------------------
# Create
# ------------------------------------------------------------------------------------------


def report_create(cells: list[Any]) -> list[dict[str, Any]]:
    print("\n== Create task: POST /api/v1/tasks (full stack) vs bare FastAPI+asyncpg vs pgbench ==")
    print("full    = `python -m app serve` (system JWT, RBAC, pydantic body, RLS, admission, audit, new task returned)")
    print("bare    = bench/bare_app.py: same pool code, set_context + create_task, no auth, no models")
    print("pgbench = bench/pgbench_create.sql: BEGIN; set_context; create_task; COMMIT (-M prepared)")
    print("many = random tenant of 200 per request; hot = one tenant (serialised on its quota row lock)")
    print("CPU per request (µs): api = the API process, pg = its dlw_app backends, pg bg = the rest of")
    print("PostgreSQL (autovacuum, WAL writer, ...), client = load generator or pgbench;")
    print("busy = share of the machine's cores busy during the cell, other = of which outside this benchmark.")
    print("Each row is the system's best round (the progress lines above show every round).\n")
    print_table_head(
        f"{'tenancy':7} {'conc':>4} {'system':8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
        f" {'api':>6} {'pg':>6} {'pg bg':>6} {'client':>6} {'busy':>5} {'other':>5}"
    )
    for c in cells:
        print(
            f"{c.tenancy:7} {c.concurrency:>4} {c.system:8} {c.rps:>8.0f} {c.p50_ms:>7.2f} {c.p99_ms:>7.2f}"
            f" {c.errors:>6} {_fmt(c.server_cpu_us, '>6.0f'):>6} {c.pg_cpu_us:>6.0f} {c.pg_other_cpu_us:>6.0f}"
            f" {c.client_cpu_us:>6.0f} {c.machine_busy:>5.0%} {c.others_busy:>5.0%}"
        )
    rows: list[dict[str, Any]] = []
    by_key = {(c.tenancy, c.concurrency, c.system): c for c in cells}
    print(f"\nRatios of req/s (targets: full/bare >= {CREATE_MIN_VS_BARE}, full/pgbench >= {CREATE_MIN_VS_PGBENCH})")
    print("cpu columns (informational, less sensitive to other load): the same ratios from CPU per request,")
    print("(api + pg) of the other system / (api + pg) of full: what full would reach if CPU were the only limit.")
    print_table_head(
        f"{'tenancy':7} {'conc':>4} {'full/bare':>9} {'':6} {'full/pgbench':>12} {'':6} {'bare/pgbench':>12}"
        f" {'cpu full/bare':>13} {'cpu full/pgbench':>16}"
    )
    for tenancy, conc, system in by_key:
        if system != "full":
            continue
        full, bare, pgb = (by_key[(tenancy, conc, s)] for s in ("full", "bare", "pgbench"))
        vs_bare = full.rps / bare.rps if bare.rps else 0.0
        vs_pgb = full.rps / pgb.rps if pgb.rps else 0.0
        bare_pgb = bare.rps / pgb.rps if pgb.rps else 0.0
        full_cpu = (full.server_cpu_us or 0.0) + full.pg_cpu_us
        cpu_bare = ((bare.server_cpu_us or 0.0) + bare.pg_cpu_us) / full_cpu if full_cpu else 0.0
        cpu_pgb = pgb.pg_cpu_us / full_cpu if full_cpu else 0.0
        print(
            f"{tenancy:7} {conc:>4} {vs_bare:>9.2f} {_verdict(vs_bare >= CREATE_MIN_VS_BARE):6}"
            f" {vs_pgb:>12.2f} {_verdict(vs_pgb >= CREATE_MIN_VS_PGBENCH):6} {bare_pgb:>12.2f}"
            f" {cpu_bare:>13.2f} {cpu_pgb:>16.2f}"
        )
        rows.append(
            {"measure": f"create {tenancy} c={conc} full/bare req/s", "ratio": vs_bare, "target": ">= 0.8",
             "met": vs_bare >= CREATE_MIN_VS_BARE}
        )  # fmt: skip
        rows.append(
            {"measure": f"create {tenancy} c={conc} full/pgbench req/s", "ratio": vs_pgb, "target": ">= 0.3",
             "met": vs_pgb >= CREATE_MIN_VS_PGBENCH}
        )  # fmt: skip
    errors = sum(c.errors for c in cells)
    if errors:
        print(f"\nWARNING: {errors} requests did not answer 201 (see the progress lines for samples)")
    return rows


# ------------------------------------------------------------------------------------------
# List
# ------------------------------------------------------------------------------------------


def report_list(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result["stats"]
    print(
        f"\n== List: first page (50) of GET /api/v1/tasks at {result['tasks']:,} tasks / {result['tenants']:,}"
        f" tenants (table {result['table_size']}) =="
    )
    print(f"route SQL ({result['route_sql_source']}):\n  {result['route_sql']}")
    print(f"explicit SQL (superuser, RLS not applied):\n  {result['explicit_sql']}")
    print(f"{s['rls_query']['n']} executions each, random tenants, prepared statements, one connection each\n")
    print_table_head(f"{'':58} {'mean µs':>8} {'p50 µs':>8} {'p99 µs':>8}")
    labels = {
        "rls_query": "query, RLS (dlw_app after set_context)",
        "plain_query": "query, explicit WHERE tenant_id (superuser)",
        "rls_request": "request, RLS: BEGIN; set_context; query; COMMIT",
        "plain_request": "request, explicit: the query alone (autocommit)",
    }
    for key, label in labels.items():
        print(f"{label:58} {s[key]['mean_us']:>8.0f} {s[key]['p50_us']:>8.0f} {s[key]['p99_us']:>8.0f}")
    q_mean = s["rls_query"]["mean_us"] / s["plain_query"]["mean_us"]
    q_p50 = s["rls_query"]["p50_us"] / s["plain_query"]["p50_us"]
    q_p99 = s["rls_query"]["p99_us"] / s["plain_query"]["p99_us"]
    r_mean = s["rls_request"]["mean_us"] / s["plain_request"]["mean_us"]
    print(
        f"\nRLS / explicit, query: mean {q_mean:.2f}, p50 {q_p50:.2f}, p99 {q_p99:.2f}"
        f"  (target <= {LIST_MAX_OVERHEAD:.2f} on the mean: {_verdict(q_mean <= LIST_MAX_OVERHEAD)})"
    )
    print(f"RLS / explicit, request (with the context round trips): mean {r_mean:.2f} (informational)")
    uses = {k: "tasks_tenant_created" in plan for k, plan in result["plans"].items()}
    for key, plan in result["plans"].items():
        print(f"\nEXPLAIN (ANALYZE, BUFFERS), {key} (the plan the prepared statement settled on):")
        print("  " + plan.replace("\n", "\n  "))
    print(f"\nplan uses the tenant index tasks_tenant_created: rls {uses['rls']}, explicit {uses['explicit']}")
    return [
        {"measure": "list query RLS/explicit mean", "ratio": q_mean, "target": "<= 1.10",
         "met": q_mean <= LIST_MAX_OVERHEAD},
        {"measure": "list query RLS/explicit p50", "ratio": q_p50, "target": "(info)", "met": None},
        {"measure": "list request RLS/explicit mean", "ratio": r_mean, "target": "(info)", "met": None},
        {"measure": "list plan uses tenant index (RLS)", "ratio": None, "target": "yes", "met": uses["rls"]},
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Notify: throughput under a flood of foreign grant notifications
# ------------------------------------------------------------------------------------------


def report_notify(result: dict[str, Any]) -> list[dict[str, Any]]:
    from app.authz.authorizer import CHANNEL
    from bench import notify_flood

    rounds = result["rounds"]
    print(f"\n== Notify: req/s under a flood of foreign pg_notify on {CHANNEL} ({notify_flood.GRANTS:,} grant rows) ==")
    print("full = `python -m app serve`; flooder = the tenant's reporting login in psql, bursts of")
    print(f"{notify_flood.BURST} distinct notifications then {notify_flood.PAUSE_S} s of sleep;")
    print(f"load = bench/load.py, {result['concurrency']} keep-alive connections, viewer JWT; routes:")
    for name, path in notify_flood.ROUTES.items():
        print(f"  {name:4} GET {path}")
    print("Each round measures normal and flooded side by side (order alternating); the median round counts.\n")
    print("req/s columns are client-side; cpu µs = the API process's CPU per request (normal, flooded) and")
    print("cpu ratio = normal/flooded of it (informational: what the req/s ratio would be if the API's CPU")
    print("were the only limit; it moves less when other work shares the machine).\n")
    print_table_head(
        f"{'route':5} {'round':>5} {'normal':>8} {'flooded':>8} {'ratio':>6} {'notify/s':>9}"
        f" {'cpu µs':>7} {'cpu µs':>7} {'cpu ratio':>9}"
    )
    for r in rounds:
        print(
            f"{r.route:5} {r.number:>5} {r.normal_rps:>8.0f} {r.flooded_rps:>8.0f} {r.ratio:>6.2f}"
            f" {r.sent / r.flood_s if r.flood_s else 0:>9,.0f}"
            f" {r.normal_cpu_us:>7.0f} {r.flooded_cpu_us:>7.0f} {r.cpu_ratio:>9.2f}"
        )
    print(
        f"\npolicy reloads during the flooded rounds: {result['extra_reloads']} (coalescing: expected 0);"
        f" notification queue usage after: {result['queue_usage']:.4f}"
    )
    rows: list[dict[str, Any]] = []
    for name in notify_flood.ROUTES:
        ratio = notify_flood.median_ratio(rounds, name)
        met = ratio >= notify_flood.TARGET
        cpu = notify_flood.median_ratio(rounds, name, cpu=True)
        print(
            f"{name:5} median flooded/normal {ratio:.2f}  (target >= {notify_flood.TARGET}: {_verdict(met)});"
            f" median cpu ratio {cpu:.2f}"
        )
        rows.append({"measure": f"notify flood {name} flooded/normal req/s", "ratio": ratio, "target": ">= 0.9",
                     "met": met})  # fmt: skip
        rows.append({"measure": f"notify flood {name} cpu normal/flooded", "ratio": cpu, "target": "(info)",
                     "met": None})  # fmt: skip
    rows.append({"measure": "notify flood policy reloads (0)", "ratio": float(result["extra_reloads"]),
                 "target": "0", "met": result["extra_reloads"] == 0})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------
# Refresh cost (bench/refresh_cost.py, written separately)
# ------------------------------------------------------------------------------------------


def run_refresh(quick: bool) -> list[dict[str, Any]] | None:
    try:
        refresh_cost = importlib.import_module("bench.refresh_cost")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.refresh_cost":
            raise
        print("\n== Refresh cost: skipped (bench/refresh_cost.py is not there yet) ==")
        return None
    print("\n== Refresh cost (bench/refresh_cost.py) ==", flush=True)
    kwargs = {"quick": quick} if "quick" in inspect.signature(refresh_cost.run).parameters else {}
    rows = refresh_cost.run(**kwargs)
    return list(rows or [])


def print_summary(rows: list[dict[str, Any]], refresh_rows: list[dict[str, Any]] | None) -> None:
    print("\n== Summary: DESIGN.md §6 targets ==")
    print_table_head(f"{'measure':44} {'ratio':>6} {'target':>8}  result")
    for row in rows:
        met = row["met"]
        result = "-" if met is None else _verdict(bool(met))
        print(f"{row['measure']:44} {_fmt(row['ratio'], '>6.2f'):>6} {row['target']:>8}  {result}")
    judged = [r for r in rows if r["met"] is not None]
    if judged:
        print(f"{sum(bool(r['met']) for r in judged)} of {len(judged)} checks met")
    if refresh_rows and len(refresh_rows) > 1 and "ratio_vs_smallest" in refresh_rows[-1]:
        last, first = refresh_rows[-1], refresh_rows[0]
        ratio = float(last["ratio_vs_smallest"])
        label = f"refresh at {last.get('history_events', '?'):,} / {first.get('history_events', '?'):,} history"
        print(f"{label:44} {ratio:>6.2f} {'< 2':>8}  {_verdict(ratio < 2)}  (refresh_cost's own flatness bar)")
    if refresh_rows:
        print("\nrefresh cost rows (from bench/refresh_cost.py):")
        for row in refresh_rows:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


@contextmanager
def timed_part(name: str, *, load_average: bool = True) -> Iterator[None]:
    """Prints how long the block (one part of the run) took; nothing when it raises."""
    t0 = time.monotonic()
    yield
    load = f"; load average {_loadavg()}" if load_average else ""
    print(f"\n({name} part: {time.monotonic() - t0:.0f} s{load})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (short cells, 100k tasks)")
    parser.add_argument("--only", choices=PARTS, help="run one part only")
    args = parser.parse_args(argv)
    parts = (args.only,) if args.only else PARTS
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    refresh_rows: list[dict[str, Any]] | None = None
    status = 0

    if "create" in parts or "list" in parts or "notify" in parts:
        from bench import create_path, list_rls, notify_flood
        from bench.cluster import bench_cluster

        print("starting the embedded PostgreSQL and migrating a template database ...", flush=True)
        with bench_cluster() as bench:
            print_header(bench, args.quick)
            if "create" in parts:
                with timed_part("create"):
                    print("create-task cells (rounds of warmup + measured window; the best round counts):", flush=True)
                    cells = create_path.run(
                        bench,
                        concurrencies=(1, 8) if args.quick else (1, 8, 32),
                        warmup=0.3 if args.quick else 0.4,
                        duration=1.5 if args.quick else 2.0,
                        rounds=1 if args.quick else 2,
                        quiet_budget_s=5 if args.quick else 60,
                    )
                    rows += report_create(cells)
            if "list" in parts:
                with timed_part("list"):
                    print("\nlist: loading tasks ...", flush=True)
                    result = list_rls.run(
                        bench,
                        tenants=100 if args.quick else 1000,
                        per_tenant=1000,
                        executions=300 if args.quick else 2000,
                        warmup=50 if args.quick else 200,
                    )
                    rows += report_list(result)
            if "notify" in parts:
                with timed_part("notify"):
                    print("\nnotify: alternating rounds of normal and flooded throughput:", flush=True)
                    flood = notify_flood.run(
                        bench,
                        rounds=3 if args.quick else 7,
                        duration=1.0 if args.quick else 2.0,
                        quiet_budget_s=5 if args.quick else 60,
                    )
                    rows += report_notify(flood)

    if "executor" in parts:
        from bench import executor
        from bench.cluster import bench_cluster

        with timed_part("executor"), bench_cluster() as bench:
            print("\nexecutor: transfers vs curl ...", flush=True)
            try:
                rows += executor.run(bench, quick=args.quick)
            except Exception:
                traceback.print_exc()
                status = 1

    if "refresh" in parts:
        with timed_part("refresh", load_average=False):
            try:
                refresh_rows = run_refresh(args.quick)
            except Exception:
                traceback.print_exc()
                print("refresh cost: FAILED (see the traceback above)")
                status = 1

    if "scale" in parts:
        # Self-contained (bench/scale.py: its own cluster and data); its rows join the summary.
        with timed_part("scale", load_average=False):
            try:
                from bench import scale

                rows += scale.summary_rows(scale.run(quick=args.quick))
            except Exception:
                traceback.print_exc()
                print("scale: FAILED (see the traceback above)")
                status = 1

    print_summary(rows, refresh_rows)
    print(f"\ntotal: {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Tenant-scoped list under RLS vs the same query with RLS off and an explicit tenant filter.

1,000,000 tasks over 1,000 tenants (by default), loaded as superuser with INSERT ... SELECT
generate_series, tenants interleaved in time (so one tenant's rows are spread over the heap, as
in a shared table that grew with every tenant writing). Then the first page of
GET /api/v1/tasks (the route's exact SQL, from app/db/queries.sql list_tasks) is timed:

  rls       as dlw_app, BEGIN; dlw.set_context(tenant); <route SQL>; COMMIT
  explicit  as the superuser (RLS does not apply), <route SQL> with `tenant_id = $2` added

each through a prepared statement on its own connection, for random tenants, alternating
which of the two runs first for a tenant (so neither always finds the other's pages cached).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import psycopg

from app.api.routes import tasks as task_routes
from bench.cluster import BenchCluster
from bench.load import percentile

PAGE = 50  # the route's default limit
CONTEXT_SQL = "SELECT dlw.set_context($1, $2, $3)"


def route_sql() -> tuple[str, str]:
    """The first-page query of GET /api/v1/tasks, exactly as the route builds it."""
    return task_routes.task_list_query(status=False, cursor=False), "app/db/queries.sql list_tasks"


def explicit_sql(route: str) -> str:
    """The route's query with the tenant filter written out instead of left to RLS."""
    head, sep, tail = route.partition(" ORDER BY ")
    if not sep or " WHERE " in head:
        raise ValueError(f"unexpected shape of the route's SQL: {route}")
    return f"{head} WHERE tenant_id = $2 ORDER BY {tail}"


def load(bench: BenchCluster, dbname: str, tenants: int, per_tenant: int) -> dict[str, float]:
    timings: dict[str, float] = {}
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute(
            "SELECT count(dlw.provision_tenant(format('list-t%%s', g), 'bench list tenant', 0, 0, 0))"
            " FROM generate_series(1, %s) g",
            (tenants,),
        )
        # Tasks are inserted as pending (the state-machine trigger refuses anything else). The
        # rows are valid by construction (each tenant's own default project and storage target),
        # so the load skips the per-row foreign-key triggers (replica role): a third faster.
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET work_mem = '256MB'")
        conn.execute(
            """
            INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, priority,
                                   file_count, total_bytes, created_by, created_at, updated_at)
            SELECT t.tenant_id, p.id, s.id, 'bench-org/model-' || (g %% 100), 'main', 0, 1, 1048576, 'bench',
                   now() - ((%(per)s - g) * %(tenants)s + t.k) * interval '100 milliseconds',
                   now() - ((%(per)s - g) * %(tenants)s + t.k) * interval '100 milliseconds'
              FROM (SELECT tenant_id, row_number() OVER (ORDER BY tenant_id) AS k
                      FROM dlw.tenants WHERE slug LIKE 'list-t%%') t
              JOIN dlw.projects p ON p.tenant_id = t.tenant_id AND p.is_default
              JOIN dlw.storage_targets s ON s.tenant_id = t.tenant_id AND s.name = 'default'
             CROSS JOIN generate_series(1, %(per)s) g
             ORDER BY g, t.tenant_id
            """,
            {"per": per_tenant, "tenants": tenants},
        )
        conn.execute("RESET session_replication_role")
        timings["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        timings["vacuum_analyze_s"] = time.perf_counter() - t0
    return timings


async def _measure(
    bench: BenchCluster, dbname: str, route: str, tenant_ids: list[int], executions: int, warmup: int
) -> dict[str, Any]:
    explicit = explicit_sql(route)
    app = await asyncpg.connect(bench.app_url(dbname))
    su = await asyncpg.connect(bench.superuser_url(dbname))
    try:
        rls_stmt = await app.prepare(route)
        plain_stmt = await su.prepare(explicit)
        ctx_stmt = await app.prepare(CONTEXT_SQL)

        async def rls(tid: int) -> tuple[float, float, list[Any]]:
            t0 = time.perf_counter()
            async with app.transaction():
                await ctx_stmt.fetchval(tid, "bench", "tenant_viewer")
                t1 = time.perf_counter()
                rows = await rls_stmt.fetch(PAGE)
                t2 = time.perf_counter()
            return t2 - t1, time.perf_counter() - t0, rows

        async def plain(tid: int) -> tuple[float, float, list[Any]]:
            # The query inside a transaction (like for like with rls), and the request an app
            # without RLS would make: the query alone, autocommit.
            async with su.transaction():
                t1 = time.perf_counter()
                rows = await plain_stmt.fetch(PAGE, tid)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            await plain_stmt.fetch(PAGE, tid)
            return t2 - t1, time.perf_counter() - t3, rows

        rng = random.Random(42)
        # Correctness first: both return the same page.
        for tid in rng.sample(tenant_ids, min(5, len(tenant_ids))):
            a, b = (await rls(tid))[2], (await plain(tid))[2]
            if [r["id"] for r in a] != [r["id"] for r in b] or len(a) != PAGE:
                raise AssertionError(f"tenant {tid}: RLS and explicit pages differ ({len(a)} vs {len(b)} rows)")
        samples: dict[str, list[float]] = {"rls_query": [], "plain_query": [], "rls_request": [], "plain_request": []}
        for i in range(warmup + executions):
            tid = rng.choice(tenant_ids)
            order = (rls, plain) if i % 2 else (plain, rls)
            for fn in order:
                query, request, _ = await fn(tid)
                if i >= warmup:
                    kind = "rls" if fn is rls else "plain"
                    samples[f"{kind}_query"].append(query)
                    samples[f"{kind}_request"].append(request)

        plans = {
            "rls": await _plan(app, route, tenant_ids[len(tenant_ids) // 2], rls=True),
            "explicit": await _plan(su, explicit, tenant_ids[len(tenant_ids) // 2], rls=False),
        }
    finally:
        await app.close()
        await su.close()
    stats = {}
    for key, values in samples.items():
        ordered = sorted(values)
        stats[key] = {
            "mean_us": 1e6 * sum(ordered) / len(ordered),
            "p50_us": 1e6 * percentile(ordered, 0.5),
            "p99_us": 1e6 * percentile(ordered, 0.99),
            "n": len(ordered),
        }
    return {"stats": stats, "plans": plans}


async def _plan(conn: asyncpg.Connection, query: str, tid: int, *, rls: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the prepared statement after 6 executions, i.e. with the
    plan the plan cache settled on (generic or custom), as the timed statement uses."""
    types = "bigint" + ("" if rls else ", bigint")
    args = "50" + ("" if rls else f", {int(tid)}")
    name = "bench_list_rls" if rls else "bench_list_plain"
    async with conn.transaction():
        if rls:
            await conn.execute(f"SELECT dlw.set_context({int(tid)}, 'bench', 'tenant_viewer')")
        await conn.execute(f"PREPARE {name} ({types}) AS {query}")
        for _ in range(6):
            await conn.fetch(f"EXECUTE {name} ({args})")
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name} ({args})")
        await conn.execute(f"DEALLOCATE {name}")
    return "\n".join(r[0] for r in rows)


def run(
    bench: BenchCluster,
    *,
    tenants: int = 1000,
    per_tenant: int = 1000,
    executions: int = 2000,
    warmup: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    dbname = bench.new_database("dlw_bench_list")
    route, source = route_sql()
    timings = load(bench, dbname, tenants, per_tenant)
    if progress:
        print(
            f"  list: loaded {tenants * per_tenant:,} tasks over {tenants:,} tenants in {timings['load_s']:.1f} s"
            f" (+ VACUUM ANALYZE {timings['vacuum_analyze_s']:.1f} s)",
            flush=True,
        )
    with psycopg.connect(bench.superuser_url(dbname), autocommit=True) as conn:
        ids = [
            int(r[0])
            for r in conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug LIKE 'list-t%' ORDER BY 1").fetchall()
        ]
        size = conn.execute("SELECT pg_size_pretty(pg_table_size('dlw.tasks'))").fetchone()
    result = asyncio.run(_measure(bench, dbname, route, ids, executions, warmup))
    result.update(
        tasks=tenants * per_tenant,
        tenants=tenants,
        table_size=size[0] if size else "?",
        route_sql=route,
        route_sql_source=source,
        explicit_sql=explicit_sql(route),
        **timings,
    )
    return result

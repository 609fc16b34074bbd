"""At 1,000,000 tasks over 1,000 tenants, a reporting login's queries use a tenant-leading index,
and the row-level security lookup of its tenant runs once per statement (an InitPlan), not once
per row."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.database import MigratedDb
from tests.support.tenants import drop_login

TENANTS = 1000
TASKS_PER_TENANT = 1000
STATUSES = "ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'cancelled', 'pending', 'running']"

QUERIES = {
    "latest tasks": "SELECT task_id, repo_id, status, created_at FROM reporting.tasks"
    " ORDER BY created_at DESC LIMIT 50",
    "tasks by status": "SELECT status, count(*) FROM reporting.tasks GROUP BY status",
    "live tasks with progress": "SELECT task_id, project_name, files_remaining FROM reporting.tasks"
    " WHERE status IN ('pending', 'running') ORDER BY created_at LIMIT 20",
    "quota status": "SELECT * FROM reporting.quota_status",
    "base table": "SELECT count(*) FROM dlw.tasks WHERE status = 'failed'",
}


@pytest.fixture(scope="module")
def big(db: MigratedDb) -> Iterator[dict[str, Any]]:
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.tenants (slug, display_name) SELECT 'plan-' || g, 'Plan ' || g"
            " FROM generate_series(1, %s) g",
            (TENANTS,),
        )
        conn.execute(
            "INSERT INTO dlw.projects (tenant_id, name, is_default)"
            " SELECT tenant_id, 'default', true FROM dlw.tenants WHERE slug LIKE 'plan-%%'"
        )
        conn.execute(
            "INSERT INTO dlw.storage_targets (tenant_id, name)"
            " SELECT tenant_id, 'default' FROM dlw.tenants WHERE slug LIKE 'plan-%%'"
        )
        with conn.transaction():
            # Bulk load as the superuser: foreign keys and the state machine's insert trigger are
            # skipped (every row is valid by construction); md5 ids are far cheaper than random ones.
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(
                f"""
                INSERT INTO dlw.tasks (tenant_id, id, project_id, storage_target_id, repo_id, revision, status,
                                       file_count, total_bytes, created_at)
                SELECT t.tenant_id, md5(t.tenant_id || ':' || g)::uuid, p.id, s.id, 'org/model', 'main',
                       ({STATUSES})[1 + g % 7], 1, 1000, now() - make_interval(secs => g)
                FROM dlw.tenants t
                JOIN dlw.projects p ON p.tenant_id = t.tenant_id
                JOIN dlw.storage_targets s ON s.tenant_id = t.tenant_id
                CROSS JOIN LATERAL generate_series(0, {TASKS_PER_TENANT - 1}) g
                WHERE t.slug LIKE 'plan-%'"""
            )
        conn.execute("ANALYZE dlw.tasks, dlw.tenants, dlw.projects, dlw.storage_targets")
        total = conn.execute("SELECT count(*) FROM dlw.tasks").fetchone()[0]
        login, password = f"rep_plan_{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        conn.execute("SELECT dlw_admin.create_reporting_login(%s, 'plan-500', %s)", (login, password))
        tid = conn.execute("SELECT tenant_id FROM dlw.tenants WHERE slug = 'plan-500'").fetchone()[0]
    assert total >= TENANTS * TASKS_PER_TENANT
    try:
        yield {"url": db.url(login, password), "tenant_id": tid, "total": total}
    finally:
        drop_login(db, login)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(url: str, query: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}").fetchone()
    data = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return dict(data[0])


def tenant_leading_indexes(db: MigratedDb) -> set[str]:
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT i.indexrelid::regclass::text FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = 'dlw.tasks'::regclass AND a.attname = 'tenant_id'""").fetchall()
    return {r[0].removeprefix("dlw.") for r in rows}


@pytest.mark.parametrize("name", list(QUERIES))
def test_reporting_queries_use_the_tenant_index_and_look_the_tenant_up_once(db: MigratedDb, big, name: str):
    result = explain(big["url"], QUERIES[name])
    plan = result["Plan"]
    all_nodes = list(nodes(plan))
    task_scans = [n for n in all_nodes if n.get("Relation Name") == "tasks"]
    assert task_scans, json.dumps(plan, indent=1)
    indexes = tenant_leading_indexes(db)
    for scan in task_scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), scan["Node Type"]
        if scan["Node Type"] == "Bitmap Heap Scan":
            index_nodes = [n for n in nodes(scan) if n["Node Type"] == "Bitmap Index Scan"]
        else:
            index_nodes = [scan]
        for index in index_nodes:
            assert index["Index Name"] in indexes, index["Index Name"]
            assert "tenant_id = " in index["Index Cond"], index["Index Cond"]
        # never more rows than the tenant has: nothing of the other 999 tenants is read
        assert scan["Actual Rows"] * scan["Actual Loops"] <= TASKS_PER_TENANT
    # The policy's tenant lookup (SELECT dlw.reporting_tenant_id()) is an InitPlan: run at
    # most once per statement, whatever the number of rows.
    init_plans = [n for n in all_nodes if n.get("Parent Relationship") == "InitPlan"]
    assert init_plans, json.dumps(plan, indent=1)
    assert all(n["Actual Loops"] <= 1 for n in init_plans)
    assert any(n["Actual Loops"] == 1 for n in init_plans)
    # a few pages of one tenant, not the table: the whole of dlw.tasks is tens of thousands of pages
    buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert buffers < 3000, buffers


def test_the_answers_are_the_tenants_own(big):
    with psycopg.connect(big["url"]) as conn:
        assert conn.execute("SELECT count(*), min(tenant_id), max(tenant_id) FROM reporting.tasks").fetchone() == (
            TASKS_PER_TENANT,
            big["tenant_id"],
            big["tenant_id"],
        )
        assert conn.execute("SELECT count(*) FROM dlw.tasks").fetchone() == (TASKS_PER_TENANT,)

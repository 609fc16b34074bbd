"""EXPLAIN ANALYZE tells a reporting login nothing about another tenant's rows.

For every table and view a reporting login may read, and every id, slug or name column of it,
tenant A's login runs, through the real psql,

    EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT ... WHERE <column> = <value>

once with a value that exists in tenant B and once with a random value that exists nowhere. The
two plans, literal values normalised, must be identical: no "Rows Removed by Filter: 1", no
"Heap Blocks: exact=1", no InitPlan executed in one and "never executed" in the other. An index
not led by tenant_id (a unique index on slug, an index on id alone) would let the planner fetch
B's row through the user's condition and only then drop it by the row-level security filter.

The probes run with the planner's defaults and with the scans an attacker can switch off
(SET enable_seqscan / enable_indexscan are ordinary settings), on fresh statistics (the planner
assumes big tables and likes indexes) and after ANALYZE.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from tests.support.catalog import readable_columns, readable_tables
from tests.support.database import MigratedDb, PgServer, create_database, drop_database
from tests.support.psql import ident, lit, ok, psql, sqlstates
from tests.support.tenants import SeededTenant, seeded_tenants

# The columns that identify something: ids, slugs, names, logins, event keys.
PROBED = re.compile(r"^(id|slug|name|login|event_key|.+_id|.+_name)$")

MODES = {
    "planner defaults": "",
    "no sequential scans": "SET enable_seqscan = off;",
    "bitmap scans only": "SET enable_seqscan = off; SET enable_indexscan = off; SET enable_indexonlyscan = off;",
}

# What the probes must cover at least: the examples of the hardening issue.
MUST_PROBE = {
    ("dlw.tasks", "id"),
    ("dlw.task_files", "id"),
    ("dlw.tenants", "slug"),
    ("dlw.storage_targets", "name"),
    ("dlw.usage_records", "file_id"),
    ("dlw.audit_log", "id"),
    ("dlw.reporting_logins", "login"),
    ("reporting.tasks", "task_id"),
    ("reporting.task_files", "file_id"),
    ("reporting.quota_status", "slug"),
}


@dataclass
class Probe:
    relation: str
    column: str
    columns: list[str]  # what the login may select from the relation
    existing: str  # a value of this column in tenant B
    missing: str  # a value of the same type that exists nowhere

    def statement(self, value: str) -> str:
        cols = ", ".join(ident(c) for c in self.columns)
        return (
            f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)"
            f" SELECT {cols} FROM {self.relation} WHERE {ident(self.column)} = {lit(value)};"
        )


@dataclass
class Setup:
    db: MigratedDb
    a: SeededTenant
    b: SeededTenant
    probes: list[Probe]
    skipped: frozenset[str]  # columns not probed in this setup


def missing_value(type_name: str) -> str:
    if type_name == "uuid":
        return str(uuid.uuid4())
    if type_name in ("bigint", "integer"):
        return str(900_000_000 + secrets.randbelow(1_000_000))
    return f"missing-{secrets.token_hex(6)}"


def values(conn: psycopg.Connection, relation: str, column: str, *, once: bool = False) -> list[str]:
    """The column's values this login sees (once: only those in exactly one row)."""
    query = sql.SQL(
        "SELECT v FROM (SELECT {}::text AS v, count(*) AS n FROM {} GROUP BY 1) c"
        " WHERE v IS NOT NULL AND (NOT {} OR n = 1) ORDER BY v LIMIT 1000"
    ).format(sql.Identifier(column), sql.SQL(relation), sql.Literal(once))
    return [r[0] for r in conn.execute(query).fetchall()]


def probes(db: MigratedDb, a: SeededTenant, b: SeededTenant, *, skip: frozenset[str] = frozenset()) -> list[Probe]:
    """Every (readable relation, identifying column) with a value only tenant B has (read as B's
    own login; a value A has too, like the project name 'default', proves nothing), in one row of
    B's: a value in many rows (B's tenant id after ANALYZE) is among the column's most common
    values, and the planner's estimate for it, and with it the plan, differs from a missing
    value's. Those statistics are platform-wide by design (security-model.md, Known limits)."""
    found: list[Probe] = []
    with (
        psycopg.connect(db.url(a.login, a.password), autocommit=True) as conn_a,
        psycopg.connect(db.url(b.login, b.password), autocommit=True) as conn_b,
    ):
        for relation in readable_tables(db):
            columns = readable_columns(db, relation)
            for column in (c for c in columns if PROBED.match(c) and c not in skip):
                row = conn_b.execute(
                    "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass"
                    " AND attname = %s",
                    (relation, column),
                ).fetchone()
                assert row is not None
                theirs = set(values(conn_a, relation, column))
                only_b = [v for v in values(conn_b, relation, column, once=True) if v not in theirs]
                if only_b:
                    found.append(Probe(relation, column, columns, only_b[0], missing_value(row[0])))
    return found


def filler(db: MigratedDb, b: SeededTenant, rows: int) -> None:
    """More rows for tenant B, so that ANALYZE sees tables worth an index."""
    with db.owner() as conn:
        conn.execute(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision,"
            " file_count, total_bytes)"
            " SELECT %s, %s, %s, 'beta/model-' || g, 'main', 1, 10 FROM generate_series(1, %s) g",
            (b.tenant_id, b.ids["project"], b.ids["storage_target"], rows),
        )
        conn.execute(
            "INSERT INTO dlw.task_files (tenant_id, task_id, path, size)"
            " SELECT tenant_id, id, 'weights.bin', 10 FROM dlw.tasks"
            " WHERE tenant_id = %s AND repo_id LIKE 'beta/model-%%'",
            (b.tenant_id,),
        )
        conn.execute(
            "INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id)"
            " SELECT tenant_id, 'bytes_month', 10, 'file:' || id, task_id, id FROM dlw.task_files"
            " WHERE tenant_id = %s AND path = 'weights.bin'"
            " ON CONFLICT DO NOTHING",
            (b.tenant_id,),
        )
        conn.execute(
            "INSERT INTO dlw.audit_log (tenant_id, actor, action, target)"
            " SELECT %s, 'filler', 'task.created', 'task-' || g FROM generate_series(1, %s) g",
            (b.tenant_id, rows),
        )
        conn.execute("ANALYZE")


@pytest.fixture(scope="module", params=["fresh statistics", "after ANALYZE"])
def setup(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Setup]:
    db = create_database(pg_server, "explain_" + request.param.split()[0])
    try:
        with seeded_tenants(db, "alpha", "beta") as (a, b):
            with db.owner() as conn:  # names tenant A does not have
                conn.execute("INSERT INTO dlw.projects (tenant_id, name) VALUES (%s, 'beta-only')", (b.tenant_id,))
                conn.execute(
                    "INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'beta-store')", (b.tenant_id,)
                )
            skip: frozenset[str] = frozenset()
            if request.param == "after ANALYZE":
                filler(db, b, 300)
                # B's tenant id is now the most common value of every table the filler grew, in
                # the views' underlying rows too (usage_daily sums 301 of them into one row).
                skip = frozenset({"tenant_id"})
            found = probes(db, a, b, skip=skip)
            yield Setup(db, a, b, found, skip)
    finally:
        drop_database(db)


def plans(url: str, mode: str, statements: list[str]) -> list[str]:
    """Each statement's EXPLAIN output, run in one psql session after the mode's settings."""
    marker = f"@@plan-{secrets.token_hex(4)}@@"
    script = MODES[mode] + "\n" + "\n".join(f"\\echo {marker}\n{s}" for s in statements) + "\n"
    output = ok(url, script)
    parts = output.split(marker + "\n")
    assert parts[0].strip() == "", parts[0]
    assert len(parts) == len(statements) + 1
    return [p.strip() for p in parts[1:]]


def normalised(plan: str, value: str) -> str:
    return plan.replace(lit(value), "'<value>'")


def test_the_probes_cover_every_readable_relation_and_the_issues_examples(setup: Setup):
    probed = {(p.relation, p.column) for p in setup.probes}
    assert MUST_PROBE <= probed, MUST_PROBE - probed
    expected = {
        relation
        for relation in readable_tables(setup.db)
        if any(PROBED.match(c) and c not in setup.skipped for c in readable_columns(setup.db, relation))
    }
    assert len(expected) >= 10
    assert {p.relation for p in setup.probes} == expected


@pytest.mark.parametrize("mode", list(MODES))
def test_explain_analyze_shows_the_same_plan_for_another_tenants_value_and_a_missing_one(setup: Setup, mode: str):
    url = setup.db.url(setup.a.login, setup.a.password)
    statements = [s for p in setup.probes for s in (p.statement(p.existing), p.statement(p.missing))]
    outputs = plans(url, mode, statements)
    differing = []
    for i, probe in enumerate(setup.probes):
        existing = normalised(outputs[2 * i], probe.existing)
        missing = normalised(outputs[2 * i + 1], probe.missing)
        if existing != missing:
            differing.append(
                f"{probe.relation}.{probe.column}:\n--- tenant B's value\n{existing}\n--- a missing value\n{missing}"
            )
    names = [d.partition(":")[0] for d in differing]
    assert not differing, f"{len(differing)} of {len(setup.probes)} probes differ ({mode}): {names}\n" + "\n".join(
        differing
    )


def test_the_cross_tenant_indexes_serve_dlw_system_and_never_a_query_under_rls(setup: Setup):
    """task_files_id_cross_tenant and tenants_slug_cross_tenant are on dlw.cross_tenant_key, which
    is not leakproof: PostgreSQL evaluates it only after the row-level security condition, so it
    is never an index condition under RLS, even for a role that may execute it (dlw_app). Reporting
    logins may not execute it at all. dlw_system, which bypasses RLS, finds rows through them."""
    a, b = setup.a, setup.b
    missing = str(uuid.uuid4())
    by_key = "SELECT id FROM dlw.task_files WHERE dlw.cross_tenant_key(id) = dlw.cross_tenant_key({}::uuid);"

    # A reporting login: refused (42501) whatever the value, before anything is read.
    url = setup.db.url(a.login, a.password)
    for value in (str(b.ids["task_file"]), missing):
        result = psql(url, "EXPLAIN (ANALYZE) " + by_key.format(lit(value)), merge=True)
        assert result.returncode == 3 and sqlstates(result.stdout) == ["42501"], result.stdout

    # dlw_app in tenant A, scans switched off: the index is never used, B's file never fetched.
    def as_app(value: str) -> str:
        return (
            f"BEGIN; SELECT dlw.set_context({a.tenant_id}, 'probe', 'tenant_viewer') \\gset\n"
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;\n"
            f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {by_key.format(lit(value))}\nROLLBACK;\n"
        )

    existing_plan = ok(setup.db.app_url, as_app(str(b.ids["task_file"]))).replace(str(b.ids["task_file"]), "<v>")
    missing_plan = ok(setup.db.app_url, as_app(missing)).replace(missing, "<v>")
    assert existing_plan == missing_plan
    assert "task_files_id_cross_tenant" not in existing_plan
    assert "Index Cond: (tenant_id = $0)" in existing_plan  # the policy's condition leads

    # dlw_system (BYPASSRLS), as the definer functions run: the lookups use the two indexes.
    system = (
        "SET ROLE dlw_system; SET enable_seqscan = off;\n"
        f"EXPLAIN (COSTS OFF) {by_key.format(lit(missing))}\n"
        "EXPLAIN (COSTS OFF) SELECT tenant_id FROM dlw.tenants"
        f" WHERE dlw.cross_tenant_key(slug) = dlw.cross_tenant_key({lit(b.slug)});\n"
    )
    plan = ok(setup.db.owner_url, system)
    assert "Index Scan using task_files_id_cross_tenant on task_files" in plan, plan
    assert "Index Scan using tenants_slug_cross_tenant on tenants" in plan, plan

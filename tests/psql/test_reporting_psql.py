"""Reporting logins through the real psql client: a login mapped to tenant A sees only A in
every reporting view and every base table it can read, whatever it types, and cannot learn
anything about tenant B (its slug, its task count, that it exists).

The schema behind it: tests/psql/test_reporting_views_psql.py."""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.catalog import REPORTING_DEFINERS, REPORTING_VIEWS, readable_columns, readable_tables
from tests.support.database import MigratedDb
from tests.support.psql import ident, lit, ok, psql, sqlstates
from tests.support.tenants import SeededTenant, drop_login, seed_tenant


# -- fixtures ---------------------------------------------------------------------------------
def create_login(db: MigratedDb, tenant: SeededTenant) -> None:
    """A managed reporting login for the tenant, made by the DBA function (here as superuser).
    Role names are visible to every login (pg_roles), so they do not name the tenant."""
    tenant.login = f"rep_{secrets.token_hex(5)}"
    tenant.password = secrets.token_urlsafe(12)
    with db.owner() as conn:
        conn.execute(
            "SELECT dlw_admin.create_reporting_login(%s, %s, %s)", (tenant.login, tenant.slug, tenant.password)
        )


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> Iterator[tuple[SeededTenant, SeededTenant]]:
    a = seed_tenant(db, "alpha", reporting_login=False)
    b = seed_tenant(db, "bravo-hidden-tenant", reporting_login=False)
    with db.owner() as conn:
        # A: one task finished with a succeeded file, one still pending.
        conn.execute("UPDATE dlw.tasks SET status = 'running' WHERE tenant_id = %s", (a.tenant_id,))
        conn.execute("UPDATE dlw.task_files SET status = 'assigned' WHERE tenant_id = %s", (a.tenant_id,))
        conn.execute(
            "UPDATE dlw.task_files SET status = 'succeeded', bytes_done = 10 WHERE tenant_id = %s", (a.tenant_id,)
        )
        conn.execute("UPDATE dlw.tasks SET status = 'succeeded' WHERE tenant_id = %s", (a.tenant_id,))
        conn.execute(
            "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, file_count,"
            " total_bytes) VALUES (%s, %s, %s, 'alpha/second', 'v2', 0, 0)",
            (a.tenant_id, a.ids["project"], a.ids["storage_target"]),
        )
        # B: more tasks than A, so a count of B's rows would stand out.
        for i in range(5):
            conn.execute(
                "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
                " VALUES (%s, %s, %s, %s, 'main')",
                (b.tenant_id, b.ids["project"], b.ids["storage_target"], f"bravo-hidden-tenant/extra-{i}"),
            )
    create_login(db, a)
    create_login(db, b)
    yield a, b
    drop_login(db, a.login)
    drop_login(db, b.login)


def url_of(db: MigratedDb, tenant: SeededTenant) -> str:
    return db.url(tenant.login, tenant.password)


def count_script(db: MigratedDb, tenant_id: int) -> tuple[list[str], str]:
    """For every relation dlw_reporting can read: its row count and how many rows are not tenant_id's."""
    relations = readable_tables(db)
    lines = [
        f"SELECT {lit(r)}, count(*), count(*) FILTER (WHERE tenant_id IS DISTINCT FROM {tenant_id}) FROM {r};"
        for r in relations
    ]
    return relations, "\n".join(lines) + "\n"


def counts(output: str) -> dict[str, tuple[int, int]]:
    seen: dict[str, tuple[int, int]] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(\w+\.\w+)\|(\d+)\|(\d+)", line)
        if match:
            seen[match[1]] = (int(match[2]), int(match[3]))
    return seen


# -- isolation --------------------------------------------------------------------------------
SPOOFS = {
    "none": "",
    "set_config": "SELECT set_config('dlw.tenant_id', '{b}', false), set_config('dlw.role', 'system_admin', false),"
    " set_config('dlw.user_id', 'someone', false);",
    "SET": "SET dlw.tenant_id = '{b}'; SET dlw.role = 'system_admin';",
    "transaction-local": "BEGIN; SELECT set_config('dlw.tenant_id', '{b}', true);",
    "app context function": "SELECT dlw.set_context({b}, 'x', 'system_admin');",
}


@pytest.mark.parametrize("spoof", list(SPOOFS))
def test_every_view_and_readable_table_shows_only_tenant_a(db: MigratedDb, tenants, spoof: str):
    a, b = tenants
    relations, script = count_script(db, a.tenant_id)
    assert {f"reporting.{v}" for v in REPORTING_VIEWS} <= set(relations)
    assert {"dlw.tasks", "dlw.task_files", "dlw.tenants", "dlw.usage_records"} <= set(relations)
    out = psql(url_of(db, a), SPOOFS[spoof].format(b=b.tenant_id) + "\n" + script, stop=False, merge=True).stdout
    seen = counts(out)
    assert set(seen) == set(relations), out
    assert {r: f for r, (_, f) in seen.items() if f} == {}, "rows of another tenant"
    for view in REPORTING_VIEWS:
        assert seen[f"reporting.{view}"][0] > 0, f"reporting.{view} shows tenant A nothing"
    assert seen["reporting.quota_status"] == (1, 0)
    assert seen["dlw.tasks"] == (2, 0) and seen["reporting.tasks"] == (2, 0)
    expected_errors = ["42501"] if spoof == "app context function" else []
    assert sqlstates(out) == expected_errors, out


def test_the_views_show_tenant_a_its_own_figures(db: MigratedDb, tenants):
    a, _ = tenants
    out = ok(
        url_of(db, a),
        "SELECT repo_id, status, file_count, files_succeeded, files_remaining, bytes_done, project_name,"
        " storage_target_name FROM reporting.tasks ORDER BY repo_id;\n"
        "SELECT slug, active, bytes_used_month, concurrent_tasks, snapshot_bytes_month FROM reporting.quota_status;\n"
        "SELECT metric, events, amount FROM reporting.usage_daily;\n"
        "SELECT metric, events, amount FROM reporting.usage_monthly;\n",
    )
    assert out.splitlines() == [
        "alpha/model|succeeded|1|1|0|10|default|default",
        "alpha/second|pending|0|0|0|0|default|default",
        "alpha|t|10|1|10",
        "bytes_month|1|10",
        "bytes_month|1|10",
    ]


def test_set_role_to_any_other_role_fails_or_shows_nothing(db: MigratedDb, tenants):
    a, b = tenants
    with db.owner() as conn:
        roles = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname <> %s", (a.login,))]
    assert {"postgres", "dlw_app", "dlw_system", "dlw_owner", "dlw_admin", "dlw_login_manager", b.login} <= set(roles)
    script = "".join(
        f"\\echo ROLE {r}\nSET ROLE {ident(r)};\nSELECT 'now ' || current_user;\nRESET ROLE;\n" for r in roles
    )
    script += f"\\echo ROLE (session authorization)\nSET SESSION AUTHORIZATION {ident(b.login)};\n"
    script += "\\echo ROLE (set_config)\nSELECT set_config('role', 'dlw_system', false);\n"
    out = psql(url_of(db, a), script, stop=False, merge=True).stdout
    sections = dict(s.split("\n", 1) for s in out.split("ROLE ")[1:])
    switched = [name for name, text in sections.items() if f"now {name}\n" in text]
    assert switched == ["dlw_reporting"], out  # the group it belongs to, and nothing else
    for name, text in sections.items():
        if name != "dlw_reporting":
            assert sqlstates(text) == ["42501"], (name, text)
    # As the bare group, no mapping names current_user: every relation is empty.
    _, count_all = count_script(db, a.tenant_id)
    seen = counts(ok(url_of(db, a), "SET ROLE dlw_reporting;\n" + count_all))
    assert {r: t for r, (t, _) in seen.items() if t} == {}


def test_dlw_admin_and_definer_functions_are_refused(db: MigratedDb, tenants):
    a, b = tenants
    with db.owner() as conn:
        calls = [
            r[0]
            for r in conn.execute(
                """
            SELECT format('SELECT %%s(%%s);', p.oid::regproc,
                          coalesce(string_agg(CASE WHEN t = 'anyelement'::regtype THEN 'NULL::reporting.tasks'
                                                   ELSE 'NULL::' || format_type(t, NULL) END, ', ' ORDER BY i), ''))
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY AS arg(t, i) ON true
            WHERE (n.nspname = 'dlw_admin' OR p.prosecdef) AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND NOT p.oid::regprocedure::text = ANY (%s)
            GROUP BY p.oid ORDER BY 1""",
                (sorted(REPORTING_DEFINERS),),
            )
        ]
    assert len(calls) >= 20 and any("dlw_admin.view_as_tenant" in c for c in calls)
    assert any("dlw.create_login_role" in c for c in calls) and any("dlw.login_user" in c for c in calls)
    # ...even claiming the API's trusted context first (definer functions may read it)
    prelude = (
        f"SELECT set_config('dlw.role', 'system_admin', false), set_config('dlw.tenant_id', '{b.tenant_id}', false);"
    )
    out = psql(url_of(db, a), prelude + "\n" + "\n".join(calls) + "\n", stop=False, merge=True).stdout
    assert sqlstates(out) == ["42501"] * len(calls), out
    # and a named call with B's slug fails the same way
    out = psql(url_of(db, a), f"SELECT * FROM dlw_admin.list_users({lit(b.slug)});", stop=False, merge=True).stdout
    assert "permission denied for schema dlw_admin" in out


CREATE_STATEMENTS = [
    "CREATE TABLE public.scratch (x int);",
    "CREATE TABLE dlw.scratch (x int);",
    "CREATE TABLE reporting.scratch (x int);",
    "CREATE TEMP TABLE scratch (x int);",
    "CREATE VIEW reporting.mine AS SELECT 1 AS x;",
    "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1';",
    "CREATE SCHEMA mine;",
    "CREATE ROLE mine;",
    "CREATE DATABASE mine;",
    "CREATE PUBLICATION mine FOR TABLE dlw.tasks;",
    "SELECT lo_create(0);",
    "SELECT lo_from_bytea(0, 'x');",
    "DROP VIEW reporting.tasks;",
    "ALTER VIEW reporting.tasks SET (security_invoker = false);",
    "COMMENT ON VIEW reporting.tasks IS 'mine';",
    "ALTER TABLE dlw.tasks DISABLE ROW LEVEL SECURITY;",
    "CREATE POLICY mine ON dlw.tasks FOR SELECT USING (true);",
    "BEGIN; LOCK TABLE dlw.tasks IN ACCESS EXCLUSIVE MODE; ROLLBACK;",
    "INSERT INTO reporting.task_files (tenant_id) VALUES (1);",
    "UPDATE reporting.task_files SET priority = 1;",
    "DELETE FROM reporting.audit_log;",
    "UPDATE dlw.tasks SET priority = 1;",
]


def test_the_login_can_create_change_or_lock_nothing(db: MigratedDb, tenants):
    a, _ = tenants
    out = psql(url_of(db, a), "\n".join(CREATE_STATEMENTS) + "\n", stop=False, merge=True).stdout
    assert sqlstates(out) == ["42501"] * len(CREATE_STATEMENTS), out
    with db.owner() as conn:
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == (0,)


def test_copy_shows_only_tenant_a_and_cannot_reach_files_or_write(db: MigratedDb, tenants):
    a, _ = tenants
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "audit.csv"
        out = ok(
            url_of(db, a),
            "COPY dlw.tasks (tenant_id) TO STDOUT;\n"
            "COPY (SELECT tenant_id FROM reporting.task_files) TO STDOUT;\n"
            "COPY dlw.usage_records (tenant_id, amount) TO STDOUT (FORMAT csv);\n"
            f"\\copy (SELECT tenant_id, action FROM reporting.audit_log) TO {lit(target)} (FORMAT csv)\n",
        )
        lines = out.splitlines() + target.read_text().splitlines()
    assert len(lines) >= 5
    assert {re.split(r"[\t,]", line)[0] for line in lines} == {str(a.tenant_id)}
    refused = [
        "COPY dlw.tasks TO '/tmp/dlw-reporting-copy.csv';",
        "COPY dlw.tasks TO PROGRAM 'id';",
        "COPY dlw.tasks FROM '/etc/hostname';",
        # The data's end marker: psql 15.20 and later skip what follows a refused COPY FROM STDIN
        # up to it (to an older one it is a line of its own, with no SQLSTATE to count).
        "COPY dlw.tasks FROM STDIN;\n\\.",
        "COPY dlw.task_files (assignment_token) TO STDOUT;",
        "COPY dlw.storage_targets TO STDOUT;",
        "COPY (SELECT config FROM dlw.storage_targets) TO STDOUT;",
    ]
    out = psql(url_of(db, a), "\n".join(refused) + "\n", stop=False, merge=True).stdout
    assert sqlstates(out) == ["42501"] * len(refused), out
    assert not Path("/tmp/dlw-reporting-copy.csv").exists()


def _probe(db: MigratedDb, a: SeededTenant, slug: str, tenant_id: int) -> str:
    script = f"""
        SELECT count(*) FROM dlw.tenants WHERE slug = {lit(slug)};
        SELECT count(*) FROM dlw.tenants WHERE tenant_id = {tenant_id};
        SELECT count(*) FROM dlw.tasks WHERE tenant_id = {tenant_id};
        SELECT count(*) FROM reporting.tasks WHERE tenant_id = {tenant_id};
        SELECT count(*) FROM reporting.usage_monthly WHERE tenant_id = {tenant_id};
        SELECT count(*) FROM dlw.reporting_logins WHERE tenant_id = {tenant_id};
        SELECT * FROM dlw.resolve_tenant({lit(slug)});
        SELECT dlw.bytes_used_month({tenant_id}, current_date);
        SELECT * FROM dlw_admin.view_as_tenant({lit(slug)}, NULL::reporting.tasks);
        SELECT dlw.admin_tenant_id({lit(slug)});
        SELECT count(*) FROM reporting.quota_status WHERE tenant_id = {tenant_id};
    """
    out = psql(url_of(db, a), script, stop=False, merge=True).stdout
    # psql echoes the caller's own statement (LINE n: ... and a caret) for errors with a position.
    lines = [line for line in out.splitlines() if not re.match(r"LINE \d+:|\s*\^\s*$", line)]
    return "\n".join(lines).replace(slug, "<slug>")


def test_the_login_cannot_learn_tenant_b_its_slug_its_task_count_or_its_existence(db: MigratedDb, tenants):
    a, b = tenants
    # Everything it can read, dumped: nothing of B.
    script = ""
    for relation in readable_tables(db):
        cols = ", ".join(ident(c) for c in readable_columns(db, relation))
        script += f"SELECT {cols} FROM {relation};\n"
    script += "SELECT rolname FROM pg_roles; SELECT datname FROM pg_database;\n"
    dump = ok(url_of(db, a), script, unaligned=False)
    assert a.slug in dump and b.login in dump  # B's login is listed, and says nothing about B
    for secret in (b.slug, b.slug.title(), str(b.ids["task"]), str(b.ids["project"]), "bravo"):
        assert secret not in dump, secret
    # Probing B answers exactly like probing a tenant that does not exist.
    with db.owner() as conn:
        missing_id = conn.execute("SELECT max(tenant_id) + 1000 FROM dlw.tenants").fetchone()[0]
    about_b = _probe(db, a, b.slug, b.tenant_id)
    about_nobody = _probe(db, a, "no-such-tenant", missing_id)
    assert about_b == about_nobody
    assert sqlstates(about_b) == ["42501"] * 4, about_b
    # Its own task count is all it counts.
    assert ok(url_of(db, a), "SELECT count(*) FROM dlw.tasks; SELECT count(*) FROM reporting.tasks;").split() == [
        "2",
        "2",
    ]


def test_a_role_setting_does_not_move_the_login_either(db: MigratedDb, tenants):
    """ALTER ROLE CURRENT_USER SET dlw.tenant_id: refused (PostgreSQL 16), or if accepted
    (PostgreSQL 15 lets a role set placeholders on itself) a later session still sees only A."""
    a, b = tenants
    result = psql(url_of(db, a), f"ALTER ROLE CURRENT_USER SET dlw.tenant_id = '{b.tenant_id}';")
    if result.returncode != 0:
        assert sqlstates(result.stderr) == ["42501"], result.stderr
        return
    try:
        _, script = count_script(db, a.tenant_id)
        out = ok(url_of(db, a), "SHOW dlw.tenant_id;\n" + script)
        assert out.splitlines()[0] == str(b.tenant_id)
        assert {r: f for r, (_, f) in counts(out).items() if f} == {}
    finally:
        ok(url_of(db, a), "ALTER ROLE CURRENT_USER RESET dlw.tenant_id;")


def test_an_unmapped_member_of_dlw_reporting_sees_nothing_in_the_views(db: MigratedDb, tenants):
    login, password = f"rep_unmapped_{secrets.token_hex(3)}", secrets.token_urlsafe(10)
    db.server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE dlw_reporting").format(
            sql.Identifier(login), sql.Literal(password)
        )
    )
    try:
        script = "".join(f"SELECT count(*) FROM reporting.{v};\n" for v in sorted(REPORTING_VIEWS))
        assert ok(db.url(login, password), script).split() == ["0"] * len(REPORTING_VIEWS)
    finally:
        drop_login(db, login)


def test_psql_describes_the_views_with_their_comments(db: MigratedDb, tenants):
    a, _ = tenants
    out = ok(url_of(db, a), "\\d+ reporting.quota_status\n\\dv+ reporting.*\n", unaligned=False)
    assert "Bytes downloaded this UTC month" in out
    assert "security_invoker=true" in out
    assert "One row per download task" in out


def test_connection_urls_work_with_psycopg_as_well(db: MigratedDb, tenants):
    """The same login from a driver (what Metabase and Grafana use): only its tenant."""
    a, _ = tenants
    with psycopg.connect(url_of(db, a)) as conn:
        assert conn.execute("SELECT DISTINCT tenant_id FROM reporting.audit_log").fetchall() == [(a.tenant_id,)]

"""Every SQL example in docs/reporting.md and docs/dba.md runs, in psql, as the role it names.

Each ```sql block is preceded by an HTML comment naming who runs it:

    <!-- run-as: reporting -->              a reporting login of tenant acme
    <!-- run-as: dba -->                    a login that is a member of dlw_admin, no superuser
    <!-- run-as: superuser -->              one-time setup and break-glass steps
    <!-- run-as: dba; expect-error: DLWA2 -->   the block must fail with that SQLSTATE

and `<!-- setup-as: superuser ... -->` comments hold hidden setup SQL (test data a real
system would already have), run where they stand. Role names the docs use (dba_alice,
acme_bi, acme_grafana) are cluster-wide, so each run gives them a unique suffix.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.database import MigratedDb, PgServer, create_database, drop_database
from tests.support.psql import psql, sqlstates

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROLE_NAMES = ("dba_alice", "acme_bi", "acme_grafana")
ITEM = re.compile(
    r"<!--\s*setup-as:\s*(?P<setup_role>[\w-]+)\s*\n(?P<setup_sql>.*?)-->"
    r"|<!--\s*run-as:\s*(?P<role>[\w-]+)\s*(?:;\s*expect-error:\s*(?P<code>[0-9A-Z]{5})\s*)?-->\s*\n"
    r"```sql\n(?P<sql>.*?)```",
    re.S,
)


@dataclass
class Block:
    role: str
    sql: str
    line: int
    expect_error: str | None = None
    hidden: bool = False


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in ITEM.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m["setup_role"]:
            found.append(Block(m["setup_role"], m["setup_sql"], line, hidden=True))
        else:
            found.append(Block(m["role"], m["sql"], line, m["code"]))
    return found


def renamer(suffix: str):  # type: ignore[no-untyped-def]
    pattern = re.compile(r"\b(" + "|".join(ROLE_NAMES) + r")\b")
    return lambda text: pattern.sub(lambda m: f"{m[1]}_{suffix}", text)


def run_blocks(path: Path, urls: dict[str, str], rename) -> int:  # type: ignore[no-untyped-def]
    ran = 0
    for block in blocks(path):
        assert block.role in urls, f"{path.name}:{block.line}: unknown role {block.role}"
        result = psql(urls[block.role], rename(block.sql), unaligned=False, merge=True)
        where = f"{path.name}:{block.line} as {block.role}"
        if block.expect_error:
            assert result.returncode != 0, f"{where} should fail with {block.expect_error}:\n{result.stdout}"
            assert sqlstates(result.stdout) == [block.expect_error], f"{where}:\n{result.stdout}"
        else:
            assert result.returncode == 0, f"{where} failed:\n{result.stdout}"
            assert "ERROR:" not in result.stdout, f"{where}:\n{result.stdout}"
        ran += 0 if block.hidden else 1
    return ran


def drop_roles(server: PgServer, names: list[str]) -> None:
    for name in names:
        server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.parametrize("doc", ["reporting.md", "dba.md"])
def test_every_sql_block_says_who_runs_it(doc: str):
    text = (DOCS / doc).read_text()
    fences = text.count("```sql")
    marked = [b for b in blocks(DOCS / doc) if not b.hidden]
    assert fences == len(marked) > 3, "a ```sql block without a <!-- run-as: ... --> comment right before it"
    assert {b.role for b in marked} <= {"reporting", "dba", "superuser"}


@pytest.fixture
def fresh_db(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[MigratedDb]:
    database = create_database(pg_server, "docs_" + request.node.name[5:30])
    try:
        yield database
    finally:
        drop_database(database)


def test_dba_md_runs_as_a_non_superuser_member_of_dlw_admin(pg_server: PgServer, fresh_db: MigratedDb):
    suffix = secrets.token_hex(4)
    rename = renamer(suffix)
    dba = f"dba_alice_{suffix}"
    text = (DOCS / "dba.md").read_text()
    password = re.search(r"CREATE ROLE dba_alice LOGIN PASSWORD '([^']+)' IN ROLE dlw_admin;", text)
    assert password, "dba.md creates the DBA login first"
    urls = {"superuser": fresh_db.owner_url, "dba": fresh_db.url(dba, password[1])}
    try:
        ran = run_blocks(DOCS / "dba.md", urls, rename)
        assert ran == text.count("```sql")
        with fresh_db.owner() as conn:
            # the DBA really was an ordinary login, a member of dlw_admin and nothing else
            assert conn.execute(
                "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = %s", (dba,)
            ).fetchone() == (False, False, False, False)
            assert conn.execute(
                "SELECT array_agg(r.rolname) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
                " WHERE m.member = %s::regrole",
                (dba,),
            ).fetchone() == (["dlw_admin"],)
            # ...and what the recipes did is in place and audited under the DBA's name
            tenants = dict(conn.execute("SELECT slug, active FROM dlw.tenants").fetchall())
            assert tenants == {"default": True, "acme": True, "globex-corp": False}
            assert conn.execute(
                "SELECT quota_concurrent, quota_bytes_month, quota_storage_gb FROM dlw.tenants WHERE slug = 'acme'"
            ).fetchone() == (20, 2 * 1024**4, 0)
            assert conn.execute("SELECT login FROM dlw.reporting_logins").fetchall() == [(f"acme_bi_{suffix}",)]
            assert conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname IN (%s, %s)",
                (f"acme_bi_{suffix}", f"acme_grafana_{suffix}"),
            ).fetchone() == (1,)
            actions = {
                r[0]
                for r in conn.execute("SELECT DISTINCT action FROM dlw.audit_log WHERE actor = %s", (dba,)).fetchall()
            }
            assert {
                "tenant.created",
                "tenant.renamed",
                "tenant.quota_set",
                "tenant.deactivated",
                "tenant.reactivated",
                "reporting_login.created",
                "reporting_login.password_set",
                "reporting_login.limits_set",
                "reporting_login.dropped",
                "role.granted",
                "role.revoked",
                "admin.tenants_listed",
                "admin.users_listed",
                "admin.reporting_logins_listed",
                "support.viewed_as_tenant",
            } <= actions
            assert conn.execute(
                "SELECT count(*) FROM dlw.audit_log WHERE action LIKE 'breakglass.%' AND actor = session_user"
            ).fetchone() == (2,)
        # the reporting login the recipes made works
        out = psql(
            fresh_db.url(f"acme_bi_{suffix}", "another-long-random-password"),
            "SELECT slug FROM reporting.quota_status;",
        )
        assert out.returncode == 0 and out.stdout.strip() == "acme", out.stdout + out.stderr
    finally:
        drop_roles(pg_server, [f"{name}_{suffix}" for name in ROLE_NAMES])


def seed_acme(db: MigratedDb) -> int:
    """Tenant acme with tasks in every status, files, usage and a quota refusal."""
    with db.owner() as conn:
        tid = conn.execute("SELECT dlw_admin.create_tenant('acme', 'Acme Corporation')").fetchone()[0]
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")  # insert final states directly
            conn.execute(
                """
                INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision, status,
                                       file_count, total_bytes, created_at, finished_at, error)
                SELECT %(t)s, p.id, s.id, 'acme/model-' || g, 'main',
                       (ARRAY['succeeded', 'failed', 'running', 'pending', 'cancelled'])[1 + g %% 5], 2, 2000,
                       now() - make_interval(hours => g),
                       CASE WHEN g %% 5 IN (0, 1, 4) THEN now() - make_interval(hours => g) + interval '5 min' END,
                       CASE WHEN g %% 5 = 1 THEN 'checksum mismatch' END
                FROM generate_series(0, 9) g, dlw.projects p, dlw.storage_targets s
                WHERE p.tenant_id = %(t)s AND s.tenant_id = %(t)s""",
                {"t": tid},
            )
            conn.execute(
                """
                INSERT INTO dlw.task_files (tenant_id, task_id, path, size, status, bytes_done)
                SELECT x.tenant_id, x.id, f.path, 1000,
                       CASE x.status WHEN 'running' THEN 'running' WHEN 'pending' THEN 'pending' ELSE x.status END,
                       CASE WHEN x.status = 'succeeded' THEN 1000 ELSE 0 END
                FROM dlw.tasks x, (VALUES ('config.json'), ('model.safetensors')) f(path)
                WHERE x.tenant_id = %s""",
                (tid,),
            )
            conn.execute(
                """
                INSERT INTO dlw.usage_records (tenant_id, metric, amount, event_key, task_id, file_id, occurred_at)
                SELECT f.tenant_id, 'bytes_month', f.size, 'file:' || f.id, f.task_id, f.id, f.updated_at
                FROM dlw.task_files f WHERE f.tenant_id = %s AND f.status = 'succeeded'""",
                (tid,),
            )
            conn.execute(
                "INSERT INTO dlw.audit_log (tenant_id, actor, action, target, detail)"
                " VALUES (%s, 'user-1', 'quota.exceeded', 'acme/huge', '{\"metric\": \"bytes_month\"}')",
                (tid,),
            )
    return int(tid)


def test_reporting_md_runs_as_a_reporting_login(pg_server: PgServer, fresh_db: MigratedDb):
    suffix = secrets.token_hex(4)
    login, password = f"acme_bi_{suffix}", secrets.token_urlsafe(16)
    tid = seed_acme(fresh_db)
    with fresh_db.owner() as conn:
        conn.execute("SELECT dlw_admin.create_reporting_login(%s, 'acme', %s)", (login, password))
        other = conn.execute("SELECT dlw_admin.create_tenant('initech', 'Initech')").fetchone()[0]
    try:
        url = fresh_db.url(login, password)
        ran = run_blocks(DOCS / "reporting.md", {"reporting": url}, renamer(suffix))
        assert ran == (DOCS / "reporting.md").read_text().count("```sql")
        # the examples show this tenant's figures, and only them
        out = psql(url, "SELECT count(*), count(DISTINCT tenant_id), min(tenant_id) FROM reporting.tasks;").stdout
        assert out.strip() == f"10|1|{tid}"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM reporting.tasks WHERE tenant_id = %s", (other,)).fetchone() == (
                0,
            )
    finally:
        drop_roles(pg_server, [login])

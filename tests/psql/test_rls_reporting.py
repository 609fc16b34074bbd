"""Row-level security for reporting logins: the tenant comes from the login, never a setting."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql

from tests.support.catalog import readable_columns, readable_tables
from tests.support.database import MigratedDb
from tests.support.tenants import SeededTenant, as_tenant, drop_login, seeded_tenants, tenant

SECRET_COLUMNS = [
    ("task_files", "assignment_token"),
    ("storage_targets", "config"),
    ("idempotency_keys", "key"),
    ("idempotency_keys", "request_hash"),
    ("service_accounts", "client_id"),
    ("users", "subject"),
    ("users", "email"),
]


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> Iterator[tuple[SeededTenant, SeededTenant]]:
    with seeded_tenants(db, "gamma", "delta") as (a, b):
        yield a, b


def as_login(db: MigratedDb, tenant: SeededTenant) -> psycopg.Connection:
    return psycopg.connect(db.url(tenant.login, tenant.password), autocommit=True)


def tenant_ids_seen(conn: psycopg.Connection, relation: str, columns: list[str]) -> set[int]:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    query = sql.SQL("SELECT {} FROM {}").format(cols, sql.SQL(relation))
    rows = conn.execute(query).fetchall()
    if "tenant_id" in columns:
        return {r[columns.index("tenant_id")] for r in rows}
    return {-len(rows)} if rows else set()


def test_reporting_sees_only_its_tenant_in_everything_it_can_read(db, tenants):
    a, b = tenants
    relations = readable_tables(db)
    assert "dlw.tasks" in relations and "dlw.usage_records" in relations
    with as_login(db, a) as conn:
        for relation in relations:
            columns = readable_columns(db, relation)
            assert "tenant_id" in columns, f"{relation} readable without a tenant_id to check"
            seen = tenant_ids_seen(conn, relation, columns)
            assert seen <= {a.tenant_id}, relation
        # ...and after trying to claim tenant B through the settings the API trusts:
        conn.execute("SELECT set_config('dlw.tenant_id', %s, false)", (str(b.tenant_id),))
        for relation in relations:
            seen = tenant_ids_seen(conn, relation, readable_columns(db, relation))
            assert seen <= {a.tenant_id}, relation
        assert conn.execute("SELECT count(*) FROM dlw.tasks").fetchone() == (1,)


def test_reporting_cannot_use_the_apps_context_function(db, tenants):
    a, b = tenants
    with as_login(db, a) as conn, pytest.raises(errors.InsufficientPrivilege):
        as_tenant(conn, b.tenant_id, "system_admin", user="x")


def test_reporting_cannot_write_anything(db, tenants):
    a, _ = tenants
    with db.owner() as conn:
        tables = conn.execute("""
            SELECT DISTINCT ON (1) format('%I.%I', n.nspname, c.relname), quote_ident(a.attname)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND a.attidentity = ''
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
            ORDER BY 1, a.attnum""").fetchall()
    assert len(tables) >= 12
    with as_login(db, a) as conn:
        for table, column in tables:
            for statement in (
                f"DELETE FROM {table}",
                f"UPDATE {table} SET {column} = {column}",
                f"INSERT INTO {table} DEFAULT VALUES",
                f"TRUNCATE {table}",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)


@pytest.mark.parametrize(("table", "column"), SECRET_COLUMNS)
def test_reporting_cannot_read_secret_columns(db, tenants, table, column):
    a, _ = tenants
    with as_login(db, a) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(sql.SQL("SELECT {} FROM dlw.{}").format(sql.Identifier(column), sql.Identifier(table)))


def test_reporting_sees_only_its_own_login_mapping(db, tenants):
    a, b = tenants
    with as_login(db, a) as conn:
        assert conn.execute("SELECT login, tenant_id FROM dlw.reporting_logins").fetchall() == [(a.login, a.tenant_id)]
        assert conn.execute("SELECT count(*) FROM dlw.reporting_logins WHERE login = %s", (b.login,)).fetchone() == (0,)


def test_a_login_without_mapping_sees_nothing(db, tenants):
    """A member of dlw_reporting that no one mapped to a tenant fails closed."""
    import secrets

    login, password = f"rep_unmapped_{secrets.token_hex(3)}", secrets.token_urlsafe(10)
    db.server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE dlw_reporting").format(
            sql.Identifier(login), sql.Literal(password)
        )
    )
    try:
        with psycopg.connect(db.url(login, password), autocommit=True) as conn:
            for relation in readable_tables(db):
                cols = readable_columns(db, relation)
                assert tenant_ids_seen(conn, relation, cols) == set(), relation
    finally:
        drop_login(db, login)


def test_audit_rows_do_not_carry_idempotency_keys(db: MigratedDb):
    """Reporting logins read the audit trail; a task's idempotency key is a secret, so the
    task.created audit row records only whether one was used."""
    import psycopg as pg
    from psycopg.types.json import Jsonb

    tid = tenant(db, "keyed", name="Keyed")
    with pg.connect(db.app_url) as conn:
        as_tenant(conn, tid, "tenant_operator", user="u")
        conn.execute(
            "SELECT * FROM dlw.create_task(NULL, 'default', 'o/r', 'main', 0, %s, 'secret-key-123', '\\x01')",
            (Jsonb([{"path": "a", "size": 1}]),),
        )
    with db.owner() as conn:
        detail = conn.execute(
            "SELECT detail::text FROM dlw.audit_log WHERE tenant_id = %s AND action = 'task.created'", (tid,)
        ).fetchone()[0]
    assert "secret-key-123" not in detail and '"idempotent": true' in detail

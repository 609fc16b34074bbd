"""Row-level security as the API's role (dlw_app), driven directly in SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from tests.support.database import MigratedDb
from tests.support.tenants import SeededTenant, as_tenant, seeded_tenants, tenant_tables


@pytest.fixture(scope="module")
def tenants(db: MigratedDb) -> Iterator[tuple[SeededTenant, SeededTenant]]:
    with seeded_tenants(db, "alpha", "beta") as (a, b):
        yield a, b


@pytest.fixture(scope="module")
def tables(db: MigratedDb) -> list[str]:
    with db.owner() as conn:
        found = tenant_tables(conn)
    assert len(found) >= 12
    return found


def as_app(db: MigratedDb) -> psycopg.Connection:
    return psycopg.connect(db.app_url)


def set_ctx(conn: psycopg.Connection, tenant_id: int | None, role: str = "tenant_admin") -> None:
    as_tenant(conn, tenant_id, role)


def t(name: str) -> sql.Composed:
    return sql.SQL("dlw.{}").format(sql.Identifier(name))


def counts(conn: psycopg.Connection, table: str) -> tuple[int, int]:
    row = conn.execute(sql.SQL("SELECT count(*), count(DISTINCT tenant_id) FROM {}").format(t(table))).fetchone()
    assert row is not None
    return row[0], row[1]


def test_the_owner_sees_both_tenants_in_every_table(db, tenants, tables):
    """The seed covers every tenant table, so the checks below are not vacuous."""
    with db.owner() as conn:
        for table in tables:
            assert counts(conn, table)[1] >= 2, f"seed has no rows for both tenants in {table}"


def test_context_shows_only_own_rows_in_every_table(db, tenants, tables):
    a, _ = tenants
    with as_app(db) as conn:
        set_ctx(conn, a.tenant_id)
        for table in tables:
            rows = conn.execute(sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(t(table))).fetchall()
            assert rows == [(a.tenant_id,)], table


def _insert_copy_for(
    db: MigratedDb, conn: psycopg.Connection, table: str, source_tenant: int, target_tenant: int
) -> None:
    """On conn, insert a copy of one of source_tenant's rows (read by the owner), re-labelled
    with target_tenant and with fresh unique values."""
    with db.owner() as owner:
        found = owner.execute(
            sql.SQL("SELECT to_jsonb(r) FROM {} r WHERE r.tenant_id = %s LIMIT 1").format(t(table)), (source_tenant,)
        ).fetchone()
    assert found is not None, f"no seed row in {table}"
    row = dict(found[0])
    row.update(tenant_id=target_tenant)
    for unique_col in ("id", "key", "event_key", "login", "name", "slug", "subject", "client_id"):
        if unique_col in row:
            row[unique_col] = str(uuid.uuid4()) if unique_col in ("id",) else "p" + uuid.uuid4().hex[:12]
    conn.execute(
        sql.SQL("INSERT INTO {t} SELECT (jsonb_populate_record(NULL::{t}, %s::jsonb)).*").format(t=t(table)),
        (Jsonb(row),),
    )


@pytest.mark.parametrize("role", ["tenant_admin", "tenant_operator", "tenant_viewer", "system_admin"])
def test_inserting_a_row_for_another_tenant_is_refused(db, tenants, tables, role):
    a, b = tenants
    for table in tables:
        with as_app(db) as conn:
            set_ctx(conn, a.tenant_id, role)
            with pytest.raises(errors.InsufficientPrivilege):
                _insert_copy_for(db, conn, table, a.tenant_id, b.tenant_id)


def test_moving_a_row_to_another_tenant_is_refused(db, tenants, tables):
    a, b = tenants
    for table in tables:
        with as_app(db) as conn:
            set_ctx(conn, a.tenant_id)
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(
                    sql.SQL("UPDATE {} SET tenant_id = %s WHERE tenant_id = %s").format(t(table)),
                    (b.tenant_id, a.tenant_id),
                )


def test_updates_and_deletes_never_reach_another_tenants_rows(db, tenants, tables):
    a, b = tenants
    with db.owner() as conn:
        before = {tb: counts(conn, tb) for tb in tables}
    for table in tables:
        for statement in (
            "UPDATE {} SET tenant_id = tenant_id WHERE tenant_id = %s",
            "DELETE FROM {} WHERE tenant_id = %s",
        ):
            with as_app(db) as conn:
                set_ctx(conn, a.tenant_id)
                try:
                    cur = conn.execute(sql.SQL(statement).format(t(table)), (b.tenant_id,))
                except errors.InsufficientPrivilege:
                    continue  # no privilege at all for this statement: refused outright
                assert cur.rowcount == 0, (statement, table)
                conn.commit()
    with db.owner() as conn:
        assert {tb: counts(conn, tb) for tb in tables} == before


def test_viewer_cannot_write_even_in_its_own_tenant(db, tenants):
    """Defense in depth: the role in the context gates writes, whatever the route checked."""
    a, _ = tenants
    with as_app(db) as conn:
        set_ctx(conn, a.tenant_id, "tenant_viewer")
        with pytest.raises(errors.InsufficientPrivilege):
            _insert_copy_for(db, conn, "tasks", a.tenant_id, a.tenant_id)
    with as_app(db) as conn:
        set_ctx(conn, a.tenant_id, "tenant_viewer")
        cur = conn.execute("UPDATE dlw.tasks SET priority = priority + 1")
        assert cur.rowcount == 0


@pytest.mark.parametrize("how", ["never set", "empty after an earlier committed transaction"])
def test_without_context_every_table_is_empty_and_writes_are_refused(db, tenants, tables, how):
    a, _ = tenants
    with as_app(db) as conn:
        if how != "never set":
            set_ctx(conn, a.tenant_id)
            conn.commit()
            # The pooled-connection case: the setting now reads back as '' rather than NULL.
            assert conn.execute("SELECT current_setting('dlw.tenant_id', true)").fetchone() == ("",)
        for table in tables:
            assert counts(conn, table) == (0, 0), table
            for statement in ("UPDATE {} SET tenant_id = tenant_id", "DELETE FROM {}"):
                try:
                    with conn.transaction():
                        assert conn.execute(sql.SQL(statement).format(t(table))).rowcount == 0
                except errors.InsufficientPrivilege:
                    pass
            with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
                _insert_copy_for(db, conn, table, a.tenant_id, a.tenant_id)


def test_usage_records_are_append_only_for_the_app(db, tenants):
    a, _ = tenants
    for statement in (
        "UPDATE dlw.usage_records SET amount = 0",
        "DELETE FROM dlw.usage_records",
        "TRUNCATE dlw.usage_records",
    ):
        with as_app(db) as conn:
            set_ctx(conn, a.tenant_id, "system_admin")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def test_unique_keys_without_tenant_id_are_not_writable_by_the_app(db):
    """A global unique key is a probe: a duplicate-key error would reveal another tenant's row.
    Any unique index that does not include tenant_id must be unreachable for dlw_app writes."""
    with db.owner() as conn:
        rows = conn.execute("""
            SELECT c.relname, i.indexrelid::regclass::text,
                   array_agg(a.attname ORDER BY a.attnum)
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
             AND (a.attnum = ANY (i.indkey)
                  OR EXISTS (SELECT 1 FROM pg_depend d  -- a column an index expression reads
                             WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                               AND d.refobjid = c.oid AND d.refobjsubid = a.attnum))
            WHERE n.nspname = 'dlw' AND i.indisunique
              AND EXISTS (SELECT 1 FROM pg_attribute x WHERE x.attrelid = c.oid AND x.attname = 'tenant_id')
            GROUP BY 1, 2""").fetchall()
        global_keys = [(table, index, cols) for table, index, cols in rows if "tenant_id" not in cols]
        assert global_keys, "expected the identity keys of users and reporting_logins"
        for table, _index, cols in global_keys:
            assert not conn.execute(
                "SELECT has_table_privilege('dlw_app', %s, 'INSERT')", (f"dlw.{table}",)
            ).fetchone()[0], table
            for col in cols:
                assert not conn.execute(
                    "SELECT has_column_privilege('dlw_app', %s, %s, 'UPDATE')", (f"dlw.{table}", col)
                ).fetchone()[0], (table, col)


def test_key_probes_land_in_the_callers_own_key_space(db, tenants):
    """Tenant A reusing B's ids and names neither collides with nor reveals B's rows."""
    a, b = tenants
    with as_app(db) as conn:
        set_ctx(conn, a.tenant_id)
        # Same project name as B's and B's project id reused as the key: no conflict, A's own row.
        conn.execute(
            "INSERT INTO dlw.projects (tenant_id, id, name) VALUES (%s, %s, 'probe')", (a.tenant_id, b.ids["project"])
        )
        conn.execute("INSERT INTO dlw.storage_targets (tenant_id, name) VALUES (%s, 'default-2')", (a.tenant_id,))
        conn.rollback()

        def fk_error(project_id: object) -> str:
            set_ctx(conn, a.tenant_id)
            try:
                conn.execute(
                    "INSERT INTO dlw.tasks (tenant_id, project_id, storage_target_id, repo_id, revision)"
                    " VALUES (%s, %s, %s, 'x/y', 'main')",
                    (a.tenant_id, project_id, a.ids["storage_target"]),
                )
            except errors.ForeignKeyViolation as exc:
                conn.rollback()
                return str(exc.diag.message_detail).replace(str(project_id), "<id>")
            raise AssertionError("expected a foreign-key violation")

        # B's real project id and an id that exists nowhere fail identically.
        assert fk_error(b.ids["project"]) == fk_error(uuid.uuid4())

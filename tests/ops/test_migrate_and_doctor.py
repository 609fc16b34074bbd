"""`dlw migrate` is idempotent and serialised; `dlw doctor` passes on it and catches breakage."""

from __future__ import annotations

import subprocess
import sys
import threading

import psycopg
import pytest
from psycopg import sql

from app.ops.catalog_check import audit
from app.ops.migrate import migrate, migration_ids
from tests.support.database import MigratedDb, PgServer, create_database, drop_database

# Everything a migration or the sql/ program defines, in a comparable form.
CATALOG_FINGERPRINT = """
    SELECT md5(string_agg(line, E'\\n' ORDER BY line)) FROM (
        SELECT format('table %s.%s rls=%s force=%s acl=%s', n.nspname, c.relname, c.relrowsecurity,
                      c.relforcerowsecurity, c.relacl)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'dlw'
        UNION ALL
        SELECT format('policy %s.%s %s %s %s %s %s', schemaname, tablename, policyname, roles, cmd, qual, with_check)
        FROM pg_policies WHERE schemaname = 'dlw'
        UNION ALL
        SELECT format('function %s %s %s', p.oid::regprocedure, md5(p.prosrc), p.proconfig)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'dlw'
        UNION ALL
        SELECT format('column %s.%s %s %s', table_name, column_name, data_type, column_default)
        FROM information_schema.columns WHERE table_schema = 'dlw'
    ) lines(line)"""


def fingerprint(url: str) -> str:
    with psycopg.connect(url) as conn:
        return str(conn.execute(CATALOG_FINGERPRINT).fetchone()[0])


def test_second_migrate_changes_nothing(db: MigratedDb):
    before = fingerprint(db.owner_url)
    result = migrate(db.owner_url)
    assert result.applied == []
    assert result.program_applied is False
    assert fingerprint(db.owner_url) == before


def test_forced_reapply_of_the_program_is_equivalent(db: MigratedDb):
    before = fingerprint(db.owner_url)
    assert migrate(db.owner_url, force_program=True).program_applied
    assert fingerprint(db.owner_url) == before


def test_concurrent_migrations_of_a_fresh_database(pg_server: PgServer):
    fresh = MigratedDb(pg_server, "dlw_concurrent_migrate")
    pg_server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(fresh.name)))
    pg_server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(fresh.name)))
    try:
        results: list[object] = []

        def run() -> None:
            try:
                results.append(migrate(fresh.owner_url))
            except Exception as exc:
                results.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not [r for r in results if isinstance(r, Exception)], results
        applied = sorted(m for r in results for m in r.applied)  # type: ignore[attr-defined]
        assert applied == sorted(migration_ids()), "each migration applied exactly once"
        assert audit(fresh.owner_url) == []
        with psycopg.connect(fresh.owner_url) as conn:
            assert conn.execute("SELECT slug FROM dlw.tenants").fetchall() == [("default",)]
    finally:
        drop_database(fresh)


def test_default_tenant_is_seeded_with_its_project_and_target(db: MigratedDb):
    with db.owner() as conn:
        assert conn.execute(
            "SELECT tenant_id, slug, active, quota_concurrent > 0, quota_bytes_month > 0"
            " FROM dlw.tenants WHERE tenant_id = 1"
        ).fetchone() == (1, "default", True, True, True)
        assert conn.execute("SELECT name FROM dlw.projects WHERE tenant_id = 1 AND is_default").fetchone()
        assert conn.execute("SELECT 1 FROM dlw.storage_targets WHERE tenant_id = 1 AND name = 'default'").fetchone()
        # and a tenant created afterwards does not collide with id 1
        assert conn.execute("SELECT dlw.provision_tenant('later', 'Later')").fetchone()[0] > 1


def test_doctor_passes_on_the_migrated_schema(db: MigratedDb):
    assert audit(db.owner_url) == []


def test_doctor_cli_exit_codes(db: MigratedDb):
    ok = subprocess.run(
        [sys.executable, "-m", "app", "doctor", "--database-url", db.owner_url], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "catalog OK" in ok.stdout


@pytest.mark.parametrize(
    "breakage",
    [
        (
            "CREATE TABLE dlw.broken (tenant_id bigint NOT NULL, x int)",
            "tenant table without RLS enabled and forced: dlw.broken",
        ),
        (
            "CREATE TABLE dlw.broken (tenant_id bigint NOT NULL); ALTER TABLE dlw.broken ENABLE ROW LEVEL SECURITY",
            "tenant table without RLS enabled and forced: dlw.broken",
        ),
        (
            "CREATE TABLE dlw.broken (tenant_id bigint NOT NULL);"
            " ALTER TABLE dlw.broken ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY",
            "tenant table without a policy for dlw_app: dlw.broken",
        ),
        (
            "CREATE FUNCTION dlw.sneaky() RETURNS int LANGUAGE sql SECURITY DEFINER"
            " SET search_path = pg_catalog AS 'SELECT 1'",
            "SECURITY DEFINER function not on the allowlist: dlw.sneaky()",
        ),
        (
            "CREATE FUNCTION dlw.sneaky() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'",
            "SECURITY DEFINER function without a pinned search_path: dlw.sneaky()",
        ),
        (
            "CREATE FUNCTION dlw.open_door() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog"
            " AS 'SELECT 1'; GRANT EXECUTE ON FUNCTION dlw.open_door() TO PUBLIC",
            "SECURITY DEFINER function executable by PUBLIC: dlw.open_door()",
        ),
        (
            "CREATE VIEW dlw.leaky AS SELECT tenant_id FROM dlw.tasks; GRANT SELECT ON dlw.leaky TO dlw_reporting",
            "view readable by dlw_reporting without security_invoker: dlw.leaky",
        ),
    ],
)
def test_doctor_catches_breakage(pg_server: PgServer, breakage):
    statement, expected = breakage
    broken = create_database(pg_server, "doctor_broken")
    try:
        with broken.owner() as conn:
            conn.execute(statement)
        problems = audit(broken.owner_url)
        assert expected in problems
        cli = subprocess.run(
            [sys.executable, "-m", "app", "doctor", "--database-url", broken.owner_url], capture_output=True, text=True
        )
        assert cli.returncode == 1
        assert expected in cli.stdout
    finally:
        drop_database(broken)


def test_doctor_flags_an_rls_bypassing_app_role(pg_server: PgServer, db: MigratedDb):
    pg_server.execute("ALTER ROLE dlw_app BYPASSRLS")
    try:
        assert "dlw_app is a superuser or bypasses RLS: dlw_app" in audit(db.owner_url)
    finally:
        pg_server.execute("ALTER ROLE dlw_app NOBYPASSRLS")


def test_database_privileges_admit_only_dlw_roles(db: MigratedDb, pg_server: PgServer):
    """dlw.secure_database(): CONNECT for DLW's roles only; no TEMP or CREATE for anybody else."""
    import secrets

    stranger, password = f"stranger_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    pg_server.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(stranger), sql.Literal(password))
    )
    try:
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(db.url(stranger, password)).close()
        with db.owner() as conn:
            acl = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT r, has_database_privilege(r, current_database(), 'TEMPORARY')"
                    " FROM unnest(ARRAY['dlw_app', 'dlw_reporting', 'dlw_admin']) r"
                )
            }
        assert acl == {"dlw_app": False, "dlw_reporting": False, "dlw_admin": False}
        with psycopg.connect(db.app_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TEMP TABLE t (x int)")
    finally:
        pg_server.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))

"""`dlw migrate` is idempotent and serialised; `dlw doctor` passes on it and catches breakage."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.ops.catalog_check import check_catalog
from app.ops.migrate import (
    PROGRAM_OWNERS,
    ProgramFileError,
    apply_program,
    file_owner,
    migrate,
    migration_ids,
    program_files,
)
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
        assert check_catalog(fresh.owner_url) == []
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
    assert check_catalog(db.owner_url) == []


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
            "CREATE INDEX tasks_by_repo ON dlw.tasks (repo_id, tenant_id)",
            "index on a tenant table not led by tenant_id: dlw.tasks_by_repo",
        ),
        (
            "CREATE UNIQUE INDEX storage_targets_global_name ON dlw.storage_targets (lower(name))",
            "index on a tenant table not led by tenant_id: dlw.storage_targets_global_name",
        ),
        (
            "ALTER FUNCTION dlw.cross_tenant_key(uuid) LEAKPROOF",
            "cross-tenant index key that RLS would not hold back (leakproof, inlinable or executable by"
            " dlw_reporting): dlw.cross_tenant_key(uuid)",
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
        (
            "ALTER FUNCTION dlw.executor_claim(integer, integer, text, integer) OWNER TO dlw_owner",
            "SECURITY DEFINER function owned by an unexpected role:"
            " dlw.executor_claim(integer,integer,text,integer) (owner dlw_owner, expected dlw_system)",
        ),
        (
            "ALTER FUNCTION dlw.create_login_role(text, text) OWNER TO dlw_system",
            "SECURITY DEFINER function owned by an unexpected role:"
            " dlw.create_login_role(text,text) (owner dlw_system, expected dlw_login_manager)",
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO PUBLIC",
            "advisory-lock function executable by PUBLIC: pg_advisory_lock(bigint)",
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_try_advisory_xact_lock(integer, integer) TO dlw_reporting",
            "advisory-lock function executable by a role other than the platform's:"
            " pg_try_advisory_xact_lock(integer,integer) (dlw_reporting)",
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_try_advisory_lock(bigint) TO dlw_admin",
            "advisory-lock function executable by a role other than the platform's:"
            " pg_try_advisory_lock(bigint) (dlw_admin)",
        ),
    ],
)
def test_doctor_catches_breakage(pg_server: PgServer, breakage):
    statement, expected = breakage
    broken = create_database(pg_server, "doctor_broken")
    try:
        with broken.owner() as conn:
            conn.execute(statement)
        problems = check_catalog(broken.owner_url)
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
        assert "dlw_app is a superuser or bypasses RLS: dlw_app" in check_catalog(db.owner_url)
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


def test_every_program_file_declares_one_known_owner():
    owners = {path.name: file_owner(path) for path in program_files()}
    assert set(owners.values()) == set(PROGRAM_OWNERS)
    assert owners["41_executor_claim.sql"] == "dlw_system"
    assert owners["90_login_roles.sql"] == "dlw_login_manager"


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("CREATE FUNCTION dlw.headerless() RETURNS int LANGUAGE sql RETURN 1;\n", "the first line must be"),
        ("-- owner: postgres\nSELECT 1;\n", "unknown owner 'postgres'"),
        ("-- owner: dlw_owner\nSET ROLE dlw_system;\nSELECT 1;\n", "switches role itself"),
        ("-- owner: dlw_owner\nSELECT 1;\nreset role;\n", "switches role itself"),
    ],
)
def test_apply_program_refuses_a_file_without_a_valid_owner_and_applies_nothing(
    db: MigratedDb, tmp_path: Path, text: str, refusal: str
):
    good = tmp_path / "00_good.sql"
    good.write_text(
        "-- owner: dlw_owner\nCREATE FUNCTION dlw.from_the_good_file() RETURNS int LANGUAGE sql RETURN 1;\n"
    )
    bad = tmp_path / "10_bad.sql"
    bad.write_text(text)
    with psycopg.connect(db.owner_url) as conn:
        with pytest.raises(ProgramFileError, match=refusal):
            apply_program(conn, [good, bad])
        assert conn.execute("SELECT to_regprocedure('dlw.from_the_good_file()')").fetchone() == (None,)


def test_apply_program_creates_each_files_objects_as_its_declared_owner(db: MigratedDb, tmp_path: Path):
    files = []
    for i, owner in enumerate(("dlw_system", "dlw_owner")):
        path = tmp_path / f"{i:02}_{owner}.sql"
        path.write_text(
            f"-- owner: {owner}\nCREATE FUNCTION dlw.owned_by_{owner}() RETURNS int LANGUAGE sql RETURN 1;\n"
        )
        files.append(path)
    with psycopg.connect(db.owner_url) as conn:
        apply_program(conn, files)
        owners = conn.execute(
            "SELECT proname, pg_get_userbyid(proowner) FROM pg_proc WHERE proname LIKE 'owned\\_by\\_%' ORDER BY 1"
        ).fetchall()
        assert owners == [("owned_by_dlw_owner", "dlw_owner"), ("owned_by_dlw_system", "dlw_system")]
        assert conn.execute("SELECT current_user = session_user").fetchone() == (True,)
        conn.execute("DROP FUNCTION dlw.owned_by_dlw_owner(), dlw.owned_by_dlw_system()")
        conn.commit()


def test_reapplying_the_program_drops_the_functions_it_renamed(pg_server: PgServer):
    """A database that still has the expiry sweep under its old name loses it on the next migrate."""
    upgraded = create_database(pg_server, "renamed_functions")
    try:
        with upgraded.owner() as conn:
            conn.execute("SET ROLE dlw_owner")
            conn.execute(
                "CREATE FUNCTION dlw.executor_requeue_expired(bigint, integer, integer) RETURNS integer"
                " LANGUAGE sql RETURN 0"
            )
        migrate(upgraded.owner_url, force_program=True)
        with upgraded.owner() as conn:
            assert conn.execute(
                "SELECT to_regprocedure('dlw.executor_requeue_expired(bigint,integer,integer)')"
            ).fetchone() == (None,)
        assert check_catalog(upgraded.owner_url) == []
    finally:
        drop_database(upgraded)

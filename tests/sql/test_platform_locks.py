"""No lock the platform depends on can be taken by another role: the snapshot leader's session
lock, the migrate lock and the refresh's transaction lock are advisory locks, and only the
platform's roles (and superusers) may execute the advisory-lock functions in a DLW database.

The attack: a tenant's reporting login (or a DBA) runs `SELECT pg_advisory_lock(<leader key>)`
and snapshots stop for every tenant, or takes the migrate key and `dlw migrate` hangs."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import psycopg
import pytest

from app.api.snapshot_leader import LEADER_LOCK_KEY
from app.ops.migrate import MIGRATE_LOCK_KEY
from tests.support.database import MigratedDb
from tests.support.tenants import SeededTenant, create_dba_login, drop_login, seeded_tenants

REFRESH_LOCK_KEY = 28266757964587376  # sql/50_snapshots.sql

# Every advisory-lock function of pg_catalog, with one call each (all forms: session and
# transaction, exclusive and shared, bigint and (int, int) keys, try_, unlock and unlock_all).
ADVISORY_FUNCTIONS = """
    SELECT p.oid::regprocedure::text FROM pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname ~ '^pg_(try_)?advisory_'
    ORDER BY 1"""


def split(key: int) -> tuple[int, int]:
    """The (int, int) form that names the same lock as a bigint key: high and low 32 bits."""
    high, low = key >> 32, key & 0xFFFFFFFF
    return high - (1 << 32) if high >= 1 << 31 else high, low - (1 << 32) if low >= 1 << 31 else low


def calls(key: int) -> list[str]:
    a, b = split(key)
    out = []
    for fn in ("pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"):
        out += [f"SELECT {fn}({key})", f"SELECT {fn}({a}, {b})"]
    for fn in ("pg_advisory_xact_lock", "pg_advisory_xact_lock_shared"):
        out += [f"BEGIN; SELECT {fn}({key})", f"BEGIN; SELECT {fn}({a}, {b})"]
    for fn in ("pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared"):
        out += [f"BEGIN; SELECT {fn}({key})", f"BEGIN; SELECT {fn}({a}, {b})"]
    for fn in ("pg_advisory_unlock", "pg_advisory_unlock_shared"):
        out += [f"SELECT {fn}({key})", f"SELECT {fn}({a}, {b})"]
    return [*out, "SELECT pg_advisory_unlock_all()"]


@pytest.fixture(scope="module")
def reporting(db: MigratedDb) -> Iterator[SeededTenant]:
    with seeded_tenants(db, "locks") as [t]:
        yield t


@pytest.fixture(scope="module")
def dba(db: MigratedDb) -> Iterator[tuple[str, str]]:
    name, password = f"dba_locks_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    create_dba_login(db, name, password)
    try:
        yield name, password
    finally:
        drop_login(db, name)


def refused(url: str, statement: str) -> bool:
    """Whether the statement fails with 42501 permission denied (in a fresh session)."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            for part in statement.split("; "):
                conn.execute(part)  # type: ignore[arg-type]
        except psycopg.errors.InsufficientPrivilege:
            return True
        return False


def test_the_split_key_names_the_same_lock(db: MigratedDb):
    a, b = split(LEADER_LOCK_KEY)
    with db.owner() as conn:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (a, b))
        try:
            row = conn.execute(
                "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            ).fetchone()
        finally:
            conn.execute("SELECT pg_advisory_unlock_all()")
    assert row == (LEADER_LOCK_KEY,)


def test_a_reporting_login_cannot_take_the_leader_or_the_migrate_lock(db: MigratedDb, reporting: SeededTenant):
    """The attack as reported: permission denied, not a lock held."""
    url = db.url(reporting.login, reporting.password)
    assert refused(url, f"SELECT pg_advisory_lock({LEADER_LOCK_KEY})")
    assert refused(url, f"SELECT pg_advisory_lock({MIGRATE_LOCK_KEY})")


@pytest.mark.parametrize(
    "key", [LEADER_LOCK_KEY, MIGRATE_LOCK_KEY, REFRESH_LOCK_KEY], ids=["leader", "migrate", "refresh"]
)
def test_no_form_of_any_advisory_lock_function_is_open_to_reporting_or_dba_logins(
    db: MigratedDb, reporting: SeededTenant, dba: tuple[str, str], key: int
):
    for url in (db.url(reporting.login, reporting.password), db.url(*dba)):
        allowed = [statement for statement in calls(key) if not refused(url, statement)]
        assert allowed == []


def test_only_the_platform_roles_may_execute_advisory_lock_functions(db: MigratedDb, reporting: SeededTenant):
    with db.owner() as conn:
        functions = [r[0] for r in conn.execute(ADVISORY_FUNCTIONS)]
        assert len(functions) >= 20  # every variant exists on PostgreSQL 15 and 16
        grants = conn.execute(
            "SELECT r, f FROM unnest(%s::text[]) f,"
            " unnest(ARRAY['public', 'dlw_app', 'dlw_system', 'dlw_owner', 'dlw_reporting', 'dlw_admin',"
            "              'dlw_login_manager', %s]) r"
            " WHERE has_function_privilege(r, f::regprocedure, 'EXECUTE') ORDER BY 1, 2",
            (functions, reporting.login),
        ).fetchall()
    assert grants == [
        ("dlw_app", "pg_advisory_unlock_all()"),  # asyncpg's pool resets connections with it
        ("dlw_app", "pg_advisory_xact_lock(bigint)"),  # the storage-target limit trigger
        ("dlw_app", "pg_try_advisory_lock(bigint)"),
        ("dlw_system", "pg_advisory_xact_lock(bigint)"),
        ("dlw_system", "pg_try_advisory_xact_lock(bigint)"),
    ]


def test_the_app_may_take_only_the_leaders_form_and_the_refresh_still_runs(db: MigratedDb):
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (REFRESH_LOCK_KEY,))
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        # the refresh (a dlw_system definer) takes its transaction lock on dlw_app's behalf
        assert conn.execute("SELECT ran FROM dlw.refresh_quota_snapshots()").fetchone() == (True,)


def test_a_grant_restored_by_hand_is_revoked_again_by_secure_database(db: MigratedDb, reporting: SeededTenant):
    with db.owner() as conn:
        conn.execute("GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO PUBLIC")
        try:
            assert not refused(db.url(reporting.login, reporting.password), "SELECT pg_advisory_lock(1)")
        finally:
            conn.execute("SELECT dlw.secure_database()")
        assert conn.execute(
            "SELECT has_function_privilege('public', 'pg_advisory_lock(bigint)', 'EXECUTE')"
        ).fetchone() == (False,)
    assert refused(db.url(reporting.login, reporting.password), f"SELECT pg_advisory_lock({LEADER_LOCK_KEY})")


def test_a_dba_cannot_hold_the_refresh_lock_by_idling_in_a_transaction(db: MigratedDb, dba: tuple[str, str]):
    """The refresh's lock can still be reached through the refresh itself: a DBA runs
    `BEGIN; SELECT * FROM dlw_admin.refresh_quota_snapshots();` and idles, and every later run
    skips (ran = false) until that transaction ends. The refresh bounds how long the calling
    transaction may then sit idle (10 s); the server ends the session and runs resume."""
    holder = psycopg.connect(db.url(*dba))
    try:
        assert holder.execute("SELECT ran FROM dlw_admin.refresh_quota_snapshots()").fetchone() == (True,)
        started = time.monotonic()
        with psycopg.connect(db.app_url, autocommit=True) as app:
            assert app.execute("SELECT ran FROM dlw.refresh_quota_snapshots()").fetchone() == (False,)
            while app.execute("SELECT ran FROM dlw.refresh_quota_snapshots()").fetchone() == (False,):
                assert time.monotonic() - started < 20, "the refresh lock is still held"
                time.sleep(0.5)
        held = time.monotonic() - started
        print(f"an idle DBA transaction held the refresh lock for {held:.1f} s")
        assert 9 < held < 13, held
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            holder.execute("SELECT 1")
    finally:
        holder.close()

"""A reporting transaction cannot outlive its login's limit by keeping busy (issue 11, item 4):
statement_timeout and idle_in_transaction_session_timeout bound each statement and each pause,
not the transaction, and PostgreSQL 15/16 have no setting for its age. The watchdog
(dlw.cancel_overlong_reporting_queries, run with every usage fold) terminates the session, and
`dlw doctor` reports a transaction that is over its limit (the watchdog is not running)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from app.ops.catalog_check import check_catalog
from tests.psql.test_reporting_limits import Env, wait_gone, watchdog
from tests.support.database import MigratedDb
from tests.support.psql import lit, ok
from tests.support.tenants import create_dba_login, drop_login

DOCTOR_TITLE = "reporting transaction older than its login's limit (is the watchdog running?)"


@pytest.fixture(scope="module")
def env(db: MigratedDb) -> Iterator[Env]:
    e = Env(db)
    create_dba_login(db, e.dba, "dba-age-pw")
    e.dba_url = db.url(e.dba, "dba-age-pw")
    ok(e.dba_url, "SELECT dlw_admin.create_tenant('limits', 'Limits');")
    yield e
    for login in reversed(e.logins):
        drop_login(db, login)


def transaction_age(db: MigratedDb, pid: int) -> float:
    with db.owner() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM clock_timestamp() - xact_start) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


def test_a_busy_reporting_transaction_is_terminated_at_its_age_limit(db: MigratedDb, env: Env):
    """The attack: a reporting session keeps one transaction (its snapshot and share locks) open
    for ever by sending a short statement every second, under both timeouts, opted out of too."""
    login = env.new_login(transaction_timeout="'2 seconds'")
    out = ok(env.dba_url, f"SELECT transaction_limit FROM dlw_admin.set_reporting_login_limits({lit(login)});")
    assert out == "00:00:02\n"
    with psycopg.connect(env.url(login)) as busy, psycopg.connect(env.url(login)) as young:
        busy.execute("SET statement_timeout = 0")
        busy.execute("SET idle_in_transaction_session_timeout = 0")
        pid = int(busy.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        # Another role's long transaction is never touched.
        with psycopg.connect(db.app_url) as app:
            app.execute("SELECT 1")
            while transaction_age(db, pid) < 2.3:
                busy.execute("SELECT count(*) FROM reporting.tasks").fetchone()
                time.sleep(1.0)
                busy.execute("SELECT count(*) FROM reporting.tasks").fetchone()  # never idle for long
            young.execute("SELECT 1")  # a young transaction of the same login
            problems = [p for p in check_catalog(db.owner_url, watchdog_grace_s=0) if p.startswith(DOCTOR_TITLE)]
            assert len(problems) == 1 and f"{login} (pid {pid})" in problems[0], problems
            assert check_catalog(db.owner_url) == [], "within the watchdog's grace, doctor has nothing to say"
            assert watchdog(db) == [(pid, login, "terminated")]
            with pytest.raises(psycopg.OperationalError):
                busy.execute("SELECT 1").fetchone()
            assert young.execute("SELECT 1").fetchone() == (1,)
            assert app.execute("SELECT 1").fetchone() == (1,)
    wait_gone(db, pid)
    assert [p for p in check_catalog(db.owner_url, watchdog_grace_s=0) if p.startswith(DOCTOR_TITLE)] == []


def test_the_usage_fold_runs_the_transaction_age_check(db: MigratedDb, env: Env):
    login = env.new_login(transaction_timeout="'1 second'")
    with psycopg.connect(env.url(login)) as busy:
        pid = int(busy.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        while transaction_age(db, pid) < 1.2:
            busy.execute("SELECT 1").fetchone()
            time.sleep(0.3)
        with psycopg.connect(db.app_url) as app:
            assert app.execute("SELECT ran FROM dlw.refresh_quota_snapshots()").fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1").fetchone()
